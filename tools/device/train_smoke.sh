#!/usr/bin/env bash
# The user's path on one H200 with the defaults (the lead's merged check, session 10): `megaflow train` of
# configs/h200_1b.yaml on real packed Fashion-MNIST (.fm1b, h200_1b's mix), the step graph on ('auto'), the
# loader's prefetch thread (data.prefetch auto), a checkpoint every SAVE steps while the graph replays, then the
# run resumed from its last checkpoint for RESUME more steps. Prints the logged steps, the graph's and the
# checkpoints' lines, and any error.
# Usage on the device: STEPS=60 SAVE=30 RESUME=10 bash tools/device/train_smoke.sh   (carry .whl, .fm1b, .inductor)
. tools/device/setup.sh
. tools/device/real_common.sh  # T0, since, REAL's data paths (D), quiet; the carried inductor cache
STEPS=${STEPS:-60}; SAVE=${SAVE:-30}; RESUME=${RESUME:-10}
ARGS=(--config configs/h200_1b.yaml --set data.local=$D/train --set data.tokenizer.path=$D/tokenizer.model
      --set train.dataset_limit=8000 --set train.save_every=$SAVE --set train.out_dir=/tmp/run1b)
show() { grep -E "step +[0-9]+|graph|captur|checkpoint|saved|resum|Error|Traceback|error" | grep -v "^DEBUG" | cut -c1-220; }
timeout ${TRAIN_S:-150} python3 -m megaflow.cli train "${ARGS[@]}" --set train.steps=$STEPS 2>&1 | quiet | show
echo "== rc ${PIPESTATUS[0]}"; since "train $STEPS steps"
ls /tmp/run1b 2>/dev/null | head
timeout ${RESUME_S:-90} python3 -m megaflow.cli train "${ARGS[@]}" --set train.steps=$((STEPS + RESUME)) --resume 2>&1 | quiet | show
echo "== rc ${PIPESTATUS[0]}"; since "resumed to $((STEPS + RESUME))"
