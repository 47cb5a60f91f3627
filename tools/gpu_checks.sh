#!/usr/bin/env bash
# The GPU checks of issue #18 in one script (about 12 minutes on one GPU), for a machine with CUDA.
# Usage: bash tools/gpu_checks.sh [OUT_DIR]   (a virtualenv with `pip install -e ".[dev]"` active)
#  1. make bench-trunk: images/s of trunk-once vs trunk-per-task under mixed precision
#  2. the balancer step-time table (2 and 20 tasks, both paths) on the GPU, 16-mixed
#  3. a 2-epoch run of every gradient balancer under trainer=gpu (16-mixed), then bf16-mixed
# Each part writes under OUT_DIR (default gpu_checks/); a failing run is listed, the others go on.
set -uo pipefail
out="${1:-gpu_checks}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run this on a GPU machine'" || exit 2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
failed=()
python -m mtlsparse.benchmarks.trunk --out "$out/trunk" > "$out/trunk.log" 2>&1 || failed+=("bench-trunk")
python -m mtlsparse.benchmarks.balancers --balancers all --device cuda --precision 16-mixed --repeats 3 \
    --data-root "$out/data" --out "$out/balancers" > "$out/balancers.log" 2>&1 || failed+=("balancer bench")
B="trainer.max_epochs=2 trainer.limit_train_batches=0.2 trainer.limit_val_batches=0.25 trainer.enable_progress_bar=false"
for precision in 16-mixed bf16-mixed; do
  for b in mgda fairgrad upgrad pcgrad cagrad nashmtl imtl_g aligned_mtl graddrop dualproj gradvac db_mtl moco modo sdmgrad excess_mtl; do
    dir="$out/runs/$precision/$b"; mkdir -p "$(dirname "$dir")"
    python -m mtlsparse trainer=gpu trainer.precision="$precision" balancer="$b" $B data_root="$out/data" \
        hydra.run.dir="$dir" > "$dir.log" 2>&1 || failed+=("$precision $b")
  done
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| precision | balancer | test mean acc | train samples/s |", "|---|---|---|---|"]
for m in sorted(out.glob("runs/*/*/metrics.json")):
    d = json.loads(m.read_text())
    rows.append(f"| {m.parent.parent.name} | {m.parent.name} | {d.get('test/mean_acc', float('nan')):.4f} | "
                f"{d.get('time/train_samples_per_s', float('nan')):.0f} |")
(out / "gpu_runs.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
if ((${#failed[@]})); then printf 'failed: %s\n' "${failed[@]}"; exit 1; fi
echo "all GPU checks ran; tables in $out/"
