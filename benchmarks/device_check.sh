#!/usr/bin/env bash
# The measurements that need a GPU, as one short script:
#   * the real-size matrix (MLP, 28x28 CNN, ResNet-20, small transformer; every preset family
#     against Adam): python -m benchmarks real_sizes --quick --tag <tag>
#   * the row-lane comparison (egn_ce vs sgn_ce at ~100k parameters, batch 256, 10 classes) and
#     the lane sweeps: python -m benchmarks lane_scaling --quick --tag <tag>
#
#   bash benchmarks/device_check.sh OUTDIR [TAG]     (from the repository root; TAG defaults to "gpu")
#
# Writes real_sizes.<TAG>.json/.md/.png and lane_scaling.<TAG>.json/.png into OUTDIR; commit
# them beside the CPU results in benchmarks/results/. Needs jax with a GPU backend, optax, numpy,
# matplotlib; somax is taken from src/ (no install). SOMAX_DEVICE_PROFILE=smoke runs the same
# commands on tiny problems in seconds (a check of the script on any machine).
set -euo pipefail
out="${1:?usage: bash benchmarks/device_check.sh OUTDIR [TAG]}"
tag="${2:-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
"$py" -c 'import jax; print("jax", jax.__version__, "devices", jax.devices())'
if [ "${SOMAX_DEVICE_PROFILE:-}" = smoke ]; then
  "$py" -m benchmarks real_sizes --tiny --out "$out/real_sizes.json" --tag "$tag"
  "$py" -m benchmarks lane_scaling --quick --steps 1 --max-seconds 1 --skip-ce --out "$out" --tag "$tag"
  exit 0
fi
"$py" -m benchmarks real_sizes --quick --rounds 10 --max-seconds 60 --out "$out/real_sizes.json" --tag "$tag" \
  --methods sgdm sgn_ce_light sgn_ce_heavy egn_ce_cg adahessian sophia_g sophia_h shampoo soap kfac_cp gn
"$py" -m benchmarks lane_scaling --quick --per-example-steps 0 --out "$out" --tag "$tag"
