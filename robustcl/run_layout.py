"""What a run directory holds, by name: the one list that training writes and resume, export, evaluation and
clustering read. Imports nothing, so any module can name a run's files without loading training code.

Layout::

    RUN_DIR/recipe.yaml                      resolved recipe of the run
    RUN_DIR/data_fingerprint.json            what the pretraining data was (resume refuses other data)
    RUN_DIR/checkpoints/step-00000100/       one complete `accelerator.save_state` folder, its train_state.json and
                                             a COMPLETE marker listing every file's size and SHA-256
    RUN_DIR/metrics.jsonl                    one JSON record per logged step
    RUN_DIR/summary.json                     totals of the finished run (and its evaluation)
    RUN_DIR/logs/                            the trackers' files (TensorBoard, W&B offline, ...)
    RUN_DIR/encoder/                         the export of the newest checkpoint (export_layout lists its files)
    RUN_DIR/pseudo_labels.safetensors        AdvCL's cluster labels of the pretraining images
    RUN_DIR/lpaft/pseudo_labels.safetensors  DynACL++'s cluster labels of the pretraining images (the same format)
    RUN_DIR/lpaft/encoder/                   DynACL++'s finetuned plain-BN encoder (model.safetensors) and its record
                                             (lpaft.json), written as one folder: what export and evaluation hand
                                             over while it was made from the newest checkpoint
    RUN_DIR/eval/PROTOCOL/eval.json          an evaluation report (evaluation writes it, export ships it), with
    RUN_DIR/eval/PROTOCOL/robustness_curve.png and RUN_DIR/eval/PROTOCOL/classifier/ (the finetuned classifier)

An evaluation of a model outside a run directory writes the same eval/ files elsewhere (``--output``), and
``--protocol all`` adds ``ensemble.json`` beside the three protocol folders.
"""

RECIPE_FILE = "recipe.yaml"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"  # + the optimizer step, 8 digits
TRAIN_STATE = "train_state.json"
COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOGS_DIR = "logs"
ENCODER_DIR = "encoder"
PSEUDO_LABELS_FILE = "pseudo_labels.safetensors"
LPAFT_DIR = "lpaft"  # RUN_DIR/lpaft/: PSEUDO_LABELS_FILE and LPAFT_ENCODER_DIR
LPAFT_ENCODER_DIR = "encoder"
LPAFT_RECORD_FILE = "lpaft.json"
EVAL_DIR = "eval"
REPORT_FILE = "eval.json"
CURVE_FILE = "robustness_curve.png"
CLASSIFIER_DIR = "classifier"
ENSEMBLE_FILE = "ensemble.json"
