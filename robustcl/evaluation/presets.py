"""Named finetuning presets (``eval.preset``): the SLF / ALF / AFF protocols of the scripts behind published numbers.

A figure is only comparable with the one a paper or the RobustSSL leaderboard reports when the finetuning that
produced it is the same: learning rate, schedule, augmentation, BatchNorm mode, head initialisation, attack and, above
all, which epoch is kept. A preset fills every key of ``eval.slf``, ``eval.alf`` and ``eval.aff``; a key written in the
recipe or with ``--set`` still wins (``EvalConfig``'s validator). Each value below names the file it follows (read at
the repositories' newest commits); where robustcl cannot do what a script does, the comment says so and README's
"Evaluation presets" table lists it.

This module is plain data (no torch), so that the recipe can read it while validating.
"""

from __future__ import annotations

from typing import Any

PROTOCOL_KEYS = ("slf", "alf", "aff")
DEFAULT_PRESET = "robustssl"

# What every reference script below shares: SGD with momentum 0.9 and weight decay 2e-4 on every trained tensor, the lr
# divided by 10 at each milestone, L∞ ε 8/255 with step 2/255 and 10 attack steps for training, TRADES β 6, BatchNorm in
# eval mode while attacking. Their training images go through RandomCrop(32, padding=4) + RandomHorizontalFlip.
_SHARED: dict[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 2e-4,
    "gamma": 0.1,
    "trades_beta": 6.0,
    "attack_steps": 10,
    "epsilon": 8 / 255,
    "step_size": 2 / 255,
    "epochs": 25,
    "augment": True,
    # The scripts take the first gradient at the unclamped x + δ₀ and clamp only each step's result.
    "clamp_start": False,
    "trades_random_start": True,
    "trades_target": "shared",
    "dual_bn": False,
    "select_attack_steps": None,
    # Their finetuning loaders keep the last partial batch (no drop_last; DynACL's LPAFT.py is the one that drops it).
    "drop_last": False,
}
_FROZEN = {"train_encoder": False, "bn_mode": "eval"}
_SLF = {**_FROZEN, "train_attack": "none"}
_ALF = {**_FROZEN, "train_attack": "pgd"}
_AFF = {"train_encoder": True, "bn_mode": "train", "train_attack": "trades"}
# The scripts load a zero linear layer over the pretrained encoder (``fc.weight`` / ``fc.bias`` set to zeros) and keep
# the weights of the last epoch, measured on the test split (no validation split: the whole training split trains).
_LEADERBOARD = {"head_init": "zeros", "select_by": "final"}


def _protocol(*parts: dict[str, Any], **values: Any) -> dict[str, Any]:
    merged: dict[str, Any] = dict(_SHARED)
    for part in parts:
        merged.update(part)
    merged.update(values)
    return merged


# RobustSSL leaderboard: GodXuxilie/RobustSSL_Benchmark Finetuning_Methods/Vanilla_Finetuning/vanilla_finetuning.py
# and utils.py (once Finetuning_Methods/finetuning_eval.py). setup_hyperparameter() tunes per pretraining method and
# dataset; this is its default (--pretraining ACL, --dataset cifar10, --dualBN 1, --val 0, --test_frequency 0), the
# ACL row. Its other CIFAR-10 rows: DynACL: AFF 25 epochs, milestones [15, 20]; AdvCL, A-InfoNCE, DeACL: SLF/ALF
# milestones [15, 20], AFF 25 epochs [15, 20] with --dualBN 0 (run_vanilla_tune.sh); CIFAR-100 ACL/DynACL SLF/ALF lr
# 0.05. Set those keys (or use the method's own preset) to match another row.
_ROBUSTSSL = {
    # train_loop(): SLF/ALF run the frozen model in eval mode, batch 512, lr 0.01, decay after epochs 10 and 20.
    "slf": _protocol(_SLF, _LEADERBOARD, lr=0.01, batch_size=512, milestones=[10, 20]),
    # ALF: utils.pgd_attack, CE, uniform start in the ε-ball, forceEval.
    "alf": _protocol(_ALF, _LEADERBOARD, lr=0.01, batch_size=512, milestones=[10, 20]),
    # AFF: trades_loss_dual (--dualBN 1): clean images through the 'normal' BN branch, adversarial ones through 'pgd',
    # start x + 0.001·N(0, 1); ACL's row: 100 epochs, lr 0.1, batch 128, decay after epochs 40 and 60. The measured
    # model keeps the 'pgd' branch (save_checkpoint → cvt_state_dict_AFF with bnNameCnt 1).
    "aff": _protocol(_AFF, _LEADERBOARD, lr=0.1, batch_size=128, epochs=100, milestones=[40, 60], dual_bn=True),
}

# ACL: VITA-Group/Adversarial-Contrastive-Learning ships full finetuning only, train_trades.py + trades.py (README:
# `--decreasing_lr 40,60 --epochs 100` on CIFAR-10). Its SLF/ALF figures come from the leaderboard's ACL row above.
_ACL = {
    "slf": _ROBUSTSSL["slf"],
    "alf": _ROBUSTSSL["alf"],
    # train_trades.py: batch 128, lr 0.1, plain BN (cvt_state_dict keeps bn_list.1, the 'pgd' branch), zero fc,
    # TRADES start x + 0.001·N(0, 1). It calls scheduler.step() at the START of each epoch, so the lr is already
    # divided during epoch 40 (and 60): milestones [39, 59] in robustcl's count (step after each epoch). It keeps
    # ata_best_model: the epoch of best PGD-20 accuracy on a held-out 5,000 of the 50,000 training images
    # (split/valid_idx_std.npy, eval.data.val_fraction 0.1).
    "aff": _protocol(
        _AFF,
        head_init="zeros",
        lr=0.1,
        batch_size=128,
        epochs=100,
        milestones=[39, 59],
        select_by="robust",
        select_attack_steps=20,
    ),
}

# AdvCL: LijieFan/AdvCL ships SLF only, finetuning_advCL_SLF.py. ALF/AFF follow the leaderboard's AdvCL row
# (RobustSSL_Benchmark utils.py setup_hyperparameter 'AdvCL'; run_vanilla_tune.sh passes --dualBN 0).
_ADVCL = {
    # finetuning_advCL_SLF.py: batch 512, lr 0.01, adjust_lr divides by 10 from epoch 16 and 21 (milestones [15, 20]),
    # encoder in eval mode, a freshly initialised nn.Linear head. It keeps the epoch of best PGD-20 accuracy measured on
    # the TEST split (val_loader is CIFAR-10's test set); robustcl picks it on the validation split instead.
    "slf": _protocol(
        _SLF,
        head_init="default",
        lr=0.01,
        batch_size=512,
        milestones=[15, 20],
        select_by="robust",
        select_attack_steps=20,
    ),
    "alf": _protocol(_ALF, _LEADERBOARD, lr=0.01, batch_size=512, milestones=[15, 20]),
    # trades_loss (single BN), batch 128, lr 0.1, 25 epochs.
    "aff": _protocol(_AFF, _LEADERBOARD, lr=0.1, batch_size=128, milestones=[15, 20]),
}

# DeACL: pantheon5100/DeACL adv_finetune.py (+ trades/trades.py, bash_files/eval_cifar10_resnet18.sh). main() puts the
# encoder in TRAIN mode every epoch, for every mode: a frozen encoder's BatchNorm normalises with batch statistics and
# its running statistics follow the finetuning data. Batch 512, adjust_lr: milestones [15, 20], a freshly initialised
# LinearClassifier, final epoch (the test split is only printed every eval_freq epochs).
_DEACL_COMMON = {"bn_mode": "train", "head_init": "default", "batch_size": 512, "milestones": [15, 20]}
_DEACL = {
    # eval_cifar10_resnet18.sh runs SLF with --learning_rate 0.1; features under no_grad, encoder in train mode.
    "slf": _protocol(_SLF, _DEACL_COMMON, lr=0.1, select_by="final"),
    # ALF is TRADES on the frozen encoder (trades_loss with only the classifier's parameters in the optimizer), lr
    # 0.01 (argparse default; the script gives no other). trades_loss computes f(x) twice in train mode (the CE's and
    # the KL target's), which moves BatchNorm's running statistics once more: trades_target 'separate'.
    "alf": _protocol(_ALF, _DEACL_COMMON, lr=0.01, train_attack="trades", trades_target="separate", select_by="final"),
    # AFF: the same TRADES, encoder and classifier trained, lr 0.01, batch 512.
    "aff": _protocol(_AFF, _DEACL_COMMON, lr=0.01, trades_target="separate", select_by="final"),
}

# DynACL: PKU-ML/DYNACL test_LF.py (SLF, ALF) and test_AFF.py (+ utils.py pgd_attack, trades_loss_dual).
_DYNACL = {
    # test_LF.py: batch 512, lr 0.01, decreasing_lr 10,20, model.eval() while training, fc zeroed, last epoch.
    "slf": _protocol(_SLF, _LEADERBOARD, lr=0.01, batch_size=512, milestones=[10, 20]),
    "alf": _protocol(_ALF, _LEADERBOARD, lr=0.01, batch_size=512, milestones=[10, 20]),
    # test_AFF.py: batch 128, lr 0.1, decreasing_lr 15,20, dual BN (clean through 'normal', adversarial through 'pgd',
    # the 'pgd' branch kept), and trades_loss_dual starts its KL attack AT x: no random start.
    "aff": _protocol(
        _AFF, _LEADERBOARD, lr=0.1, batch_size=128, milestones=[15, 20], dual_bn=True, trades_random_start=False
    ),
}

# robustcl's own protocol (before presets existed): the honest one. The epoch is picked on a seeded validation split
# carved from the training split, so the test split is never looked at before it is measured.
_ROBUSTCL_COMMON = {
    "lr": 0.1,
    "batch_size": 512,
    "milestones": [15, 20],
    "head_init": "default",
    "clamp_start": True,
}
_ROBUSTCL = {
    "slf": _protocol(_SLF, _ROBUSTCL_COMMON, augment=False, select_by="clean"),
    "alf": _protocol(_ALF, _ROBUSTCL_COMMON, select_by="robust"),
    "aff": _protocol(_AFF, _ROBUSTCL_COMMON, batch_size=128, select_by="robust"),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "robustssl": _ROBUSTSSL,
    "acl": _ACL,
    "advcl": _ADVCL,
    "deacl": _DEACL,
    "dynacl": _DYNACL,
    "robustcl": _ROBUSTCL,
}


SOURCES = {
    "robustssl": "GodXuxilie/RobustSSL_Benchmark Finetuning_Methods/Vanilla_Finetuning/vanilla_finetuning.py, utils.py",
    "acl": "VITA-Group/Adversarial-Contrastive-Learning train_trades.py, trades.py (SLF/ALF: as robustssl)",
    "advcl": "LijieFan/AdvCL finetuning_advCL_SLF.py (ALF/AFF: RobustSSL_Benchmark utils.py, AdvCL row)",
    "deacl": "pantheon5100/DeACL adv_finetune.py, trades/trades.py, bash_files/eval_cifar10_resnet18.sh",
    "dynacl": "PKU-ML/DYNACL test_LF.py, test_AFF.py, utils.py",
    "robustcl": "robustcl (validation-split selection)",
}

# The keys eval.slf / alf / aff had before presets, and their values then (robustcl's protocol): a recipe stored by
# that version (a run directory, an export) lists all of them and no eval.preset. Those values are read as "not set",
# so the preset applies; a value that differs was the user's and stays.
LEGACY_KEYS = (
    "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones", "gamma", "train_encoder", "augment",
    "train_attack", "trades_beta", "attack_steps", "epsilon", "step_size", "select_by",
)  # fmt: skip


def preset_values(name: str, protocol: str) -> dict[str, Any]:
    """Every ``eval.<protocol>`` key's value under preset ``name`` (a copy)."""
    values = PRESETS[name][protocol]
    return {k: list(v) if isinstance(v, list) else v for k, v in values.items()}


def legacy_changes(protocol: str, given: dict[str, Any]) -> dict[str, Any]:
    """Of an ``eval.<protocol>`` section written before presets (every :data:`LEGACY_KEYS` key present), the keys
    whose value differs from what robustcl then used: what its user chose."""
    before = PRESETS["robustcl"][protocol]
    return {k: v for k, v in given.items() if k not in LEGACY_KEYS or v != before[k]}


def is_legacy(given: Any) -> bool:
    return isinstance(given, dict) and all(k in given for k in LEGACY_KEYS)
