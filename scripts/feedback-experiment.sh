#!/usr/bin/env bash
# The reader-feedback retrain experiment (issue 14 item 6, docs/feedback.md), chest CT, one command:
#
#   scripts/feedback-experiment.sh OUT BASE_FPR_RUN [FEEDBACK_CASES]
#
# BASE_FPR_RUN is a finished `python -m training.cade.fpr` run folder (its vois.npz and registered
# classifier): the detector a reader reviews. Its two-stage detector (shipped U-Net + that classifier)
# runs on FEEDBACK_CASES (default 20) phantoms of the task's feedback seed at its default cut-off
# (4 FP/case on validation); the phantom reader (`wlcad feedback simulate`) calls each candidate TP or
# FP and `wlcad feedback ingest` grows a copy of the manifest; the classifier is retrained on the base
# run's VOIs plus the feedback (its lesions, its rejected candidates as hard negatives), same seed and
# steps (no validation run: the comparison needs no operating points); both two-stage detectors run
# on the same 40 test cases (seed 1103) and
# training/cade/compare.py prints each CPM and the paired CI of the difference.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/feedback-experiment.sh OUT BASE_FPR_RUN [FEEDBACK_CASES]}
BASE=${2:?usage: scripts/feedback-experiment.sh OUT BASE_FPR_RUN [FEEDBACK_CASES]}
CASES=${3:-20}
PY=.venv/bin/python
WLCAD=".venv/bin/python -m services.cli.main"
TASK=chest-ct-nodule
UNET=model_repository/cade_$TASK/1/model.onnx
mkdir -p "$OUT"

# 0. the reviewed detector's repository: the shipped U-Net and the base classifier
rm -rf "$OUT/base-repo" && mkdir -p "$OUT/base-repo"
cp -r "model_repository/cade_$TASK" "$OUT/base-repo/"
cp -r "$BASE/model_repository/cade_${TASK}_fpr" "$OUT/base-repo/"

# 1. the archive the reader reviews
FEEDBACK=$($PY -c "from training.cade.samples import phantom_split; from training.cade.tasks import get_task; \
print(phantom_split(get_task('$TASK'), 'feedback', $CASES, '$OUT/data'))")

# 2. the base detector's candidates at its default cut-off, 3. the reader's verdicts grow the manifest
$WLCAD detect --task $TASK --manifest "$FEEDBACK" --out "$OUT/reviewed" --model-repository "$OUT/base-repo"
GROWN="$(dirname "$FEEDBACK")/grown.csv"
cp "$FEEDBACK" "$GROWN"
mkdir -p "$OUT/verdicts"
for candidates in "$OUT"/reviewed/*.json; do
  # a case without candidates at the cut-off gives the reader nothing to judge
  $PY -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['candidates'] else 1)" "$candidates" || continue
  verdicts="$OUT/verdicts/$(basename "$candidates")"
  $WLCAD feedback simulate --candidates "$candidates" --manifest "$FEEDBACK" --out "$verdicts"
  $WLCAD feedback ingest "$verdicts" --candidates "$candidates" --manifest "$GROWN" > /dev/null
done

# 4. the classifier retrained with the feedback (the base VOIs reused: same cases, same first stage)
mkdir -p "$OUT/grown"
cp "$BASE/vois.npz" "$OUT/grown/vois.npz"
$PY -m training.cade.fpr --out "$OUT/grown" --unet "$UNET" --steps 1500 --threads 2 \
    --feedback-manifest "$GROWN" --validation-cases 0 --test-cases 40 --hybrid-test-cases 0

# 5. the base detector on the same test cases (predictions kept), 6. the paired comparison
$PY -c "
from pathlib import Path
from training.cade.evaluate import evaluate_split, two_stage_detector
from training.cade.samples import phantom_split
from training.cade.tasks import get_task
task = get_task('$TASK')
for split, count in (('test', 40),):
    manifest = phantom_split(task, split, count, Path('$OUT/grown/data'))
    detector = two_stage_detector(task, Path('$UNET'), Path('$OUT/base-repo/cade_${TASK}_fpr/1/model.onnx'), 2)
    evaluate_split(task, detector, manifest, Path('$OUT/base-evaluation') / split)
"
for split in test; do
  $PY -m training.cade.compare --manifest "$OUT/grown/data/$split/manifest.csv" \
      --pred "$OUT/base-evaluation/$split/predictions.json" --pred "$OUT/grown/evaluation/$split/predictions.json" \
      --out "$OUT/compare-$split.json"
done
