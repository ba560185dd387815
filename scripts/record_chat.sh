#!/usr/bin/env bash
# Record a vlm.chat session on a trained run: a shapes validation image, a grounding question, the reply streamed,
# the annotated image saved. Writes docs/images/chat/question.png, docs/images/chat/boxes_001.png (when the reply
# holds a box), docs/chat_session.txt (the transcript) and docs/chat_history.json (the history, save_history's
# format: its image in docs/chat_history_images/), for docs/inference.md.
#   bash scripts/record_chat.sh runs/tiny/<run>          (the default job: python -m vlm.train)
set -euo pipefail
RUN="$(cd "${1:?usage: bash scripts/record_chat.sh RUN_DIR}" && pwd)"
cd "$(dirname "$0")/.."
mkdir -p docs/images/chat
rm -f docs/images/chat/boxes_*.png
QUESTION=$(python - "$RUN" <<'PY'
import sys
from vlm.data.shapes import ShapesDataset
from vlm.inference.load import open_model

size = open_model(sys.argv[1]).model.image_size
sample = ShapesDataset(split="val", size=8, tasks={"grounding": 1.0}, image_size=size, seed=0)[0]
sample.images[0].save("docs/images/chat/question.png")
print(sample.messages[0].text().replace("<image>", "").strip())
PY
)
printf '/image docs/images/chat/question.png\n%s\n/save docs/chat_history.json\n/quit\n' "$QUESTION" \
  | python -m vlm.chat "$RUN" --out-dir docs/images/chat --max-new-tokens 40 2>&1 | tee docs/chat_session.txt
echo "transcript: docs/chat_session.txt"
