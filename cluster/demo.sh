#!/usr/bin/env bash
# The main job end to end on this machine (what `make demo` runs):
#   1. the built-in demo data set -> word2vec + small autoencoder -> shards   (skipped when present)
#   2. a local two-node Ray cluster with an MLflow server                     (reused when running)
#   3. `ray job submit` of jobs/train.py with configs/demo.yaml (checkpoints validated on the head's validation slot)
#   4. the final sample grids, the text->image and image->text attribute accuracy against chance, and
#      where things are; it fails unless BOTH directions get the colour right more than 3x as often as chance
#      and the shape more than 2x.
# The cluster stays up so the MLflow UI can be browsed; stop it with `cluster/local.sh stop`.
#
# Settings (environment variables): DEMO_DATA [data/demo], DEMO_RUNS [runs], DEMO_SAMPLES [4000],
# DEMO_VAE_STEPS [800], and extra training overrides as arguments, e.g. `cluster/demo.sh optim.steps=300`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -x .venv/bin/python ]] && export PATH="$ROOT/.venv/bin:$PATH"
export RAY_AUTH_MODE=token
DATA=$(realpath -m "${DEMO_DATA:-data/demo}")
RUNS=$(realpath -m "${DEMO_RUNS:-runs}")
NAME="demo-$(date +%Y%m%d-%H%M%S)"

if [[ -f "$DATA/train/manifest.json" && -f "$DATA/val/manifest.json" ]]; then
    echo "==> demo shards already in $DATA"
else
    echo "==> generating the demo data set and shards in $DATA"
    python -m dataprep demo --out "$DATA" --samples "${DEMO_SAMPLES:-4000}" --vae-steps "${DEMO_VAE_STEPS:-800}" \
        --max-objects 1 --samples-per-shard 200 --val-fraction 0.1
fi

if cluster/local.sh status >/dev/null 2>&1; then
    echo "==> using the running local cluster"
else
    cluster/local.sh start --workers 1 --cpus-per-node 1
fi
eval "$(cluster/local.sh env)"

mkdir -p "$RUNS"
LOG="$RUNS/$NAME.log"
echo "==> submitting the training job (run $NAME, log $LOG)"
ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python jobs/train.py --config configs/demo.yaml \
    "data.train=$DATA/train" "data.val=$DATA/val" "run.storage_path=$RUNS" "run.name=$NAME" \
    "run.validation_resources={validation: 1}" "$@" | tee "$LOG"

python - "$LOG" "$MLFLOW_TRACKING_URI" <<'EOF'
import json, sys
import mlflow
from dataprep.shapes import ATTRIBUTES, CHANCE

log, tracking_uri = sys.argv[1:]
chance = CHANCE["objects"]  # the scene of the set built above
done = [line for line in open(log) if line.startswith("train: done ")]
if not done:
    sys.exit(f"demo: the training job did not finish; see {log}")
summary = json.loads(done[-1].removeprefix("train: done "))
run = mlflow.MlflowClient(tracking_uri).get_run(summary["run_id"])
# Attribute-reader accuracy of the last validation samples: generated images scored against their
# prompts (text->image), generated captions against the true captions of known images (image->text).
REQUIRED = {"colour": 3, "shape": 2}  # times chance, in both directions
failed = []
for direction, title in (("t2i", "text->image"), ("i2t", "image->text")):
    print(f"\n==> {title} attribute accuracy vs chance")
    for attribute in ATTRIBUTES:
        accuracy = summary[f"{direction}_acc_{attribute}"]
        factor = REQUIRED.get(attribute, 2)
        above = accuracy > factor * chance[attribute]
        print(f"    {attribute:<9} {accuracy:6.1%}   chance {chance[attribute]:6.1%}"
              f"{f'   above {factor}x chance' if above else ''}")
        if attribute in REQUIRED and not above:
            failed.append(f"{title} {attribute} {accuracy:.1%} (needs more than {factor} x chance, "
                          f"{factor * chance[attribute]:.1%})")
print(f"""
==> where things are
    MLflow UI:    {tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}
    checkpoints:  {summary['checkpoint'].rsplit('/', 1)[0]}
    model:        {summary['model']} (registered as {summary['registered_model']})
    sample grids: {summary['samples']}/text_to_image.png, image_to_text.png
    stop the cluster with: cluster/local.sh stop""")
if failed:
    sys.exit("demo: the model did not learn to follow its conditioning well enough: " + "; ".join(failed))
EOF
