#!/usr/bin/env bash
# Everything scripts/gpu_repro.sh needs on a GPU machine without internet that already has PyTorch, Accelerate,
# transformers, safetensors, huggingface_hub, typer and the scientific stack (a typical CUDA image): the packages
# it lacks, as BUNDLE/site.tar.xz (unpack it there and put the folder on PYTHONPATH: scripts/gpu_repro.sh setup),
# and a copy of CIFAR-10 in BUNDLE/cifar10.
# BUNDLE defaults to .bundle/ (git-ignored); copy it over with the repo.
#
#   scripts/offline_bundle.sh [CIFAR10_DIR]      default ../shared/datasets/cifar10 (uoft-cs/cifar10 layout)
#
# Packages are for the GPU machine's Python (PYTHON_VERSION, default 3.12) on x86-64 Linux, without dependencies:
# each one named here is one such an image was seen to lack. pyautoattack's wheel carries a 44 MB example model that
# AutoAttack never loads: it is left out. About 60 MB in all: CIFAR-10's parquet files (JPEG inside) take 56 MB
# and do not compress; the packages, 11 MB unpacked, are packed with xz.
set -euo pipefail
cd "$(dirname "$0")/.."
source="${1:-../shared/datasets/cifar10}"
bundle="${BUNDLE:-.bundle}"
python_version="${PYTHON_VERSION:-3.12}"
wheels=(
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19            # Hugging Face datasets
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5  # the typed recipe
    pyautoattack==0.2.0                                          # AA (AutoAttack) in robustcl evaluate
)
[ -d "$source" ] || { echo "CIFAR-10 not found at $source (give its folder as the first argument)" >&2; exit 2; }
rm -rf "$bundle/cifar10" "$bundle/site" "$bundle/site.tar.xz"
mkdir -p "$bundle"
cp -r "$source" "$bundle/cifar10"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip install --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" --target "$bundle/site" "${wheels[@]}" 2>&1 | grep -v "is ignored" || true
rm -rf "$bundle/site/pyautoattack/examples" "$bundle/site/bin"
find "$bundle/site" \( -name __pycache__ -o -name tests \) -prune -exec rm -rf {} +
tar -C "$bundle" -cJf "$bundle/site.tar.xz" site
rm -rf "$bundle/site"
du -sb "$bundle"/* | awk '{printf "%6.1f MB  %s\n", $1 / 1e6, $2}'
