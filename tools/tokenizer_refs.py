#!/usr/bin/env python3
"""Record the token ids transformers gives for the tokenizer test prompts.

Run once per implementation, each adding its ids under its own name to the same JSON file:
    VENV5/bin/python tools/tokenizer_refs.py --pipeline DIR --out FILE --impl fast   # transformers 5 (tokenizers-backed)
    VENV4/bin/python tools/tokenizer_refs.py --pipeline DIR --out FILE --impl slow   # transformers 4, sentencepiece T5Tokenizer(legacy=True)
    VENV4/bin/python tools/tokenizer_refs.py --pipeline DIR --out FILE --impl fast4  # transformers 4 T5TokenizerFast
Ids are untruncated with `</s>` (`tok(prompt).input_ids`); the Rust tests pad and truncate them
themselves and also compare with the padded ids of refs/tokenizer.safetensors.
"""
import argparse
import json
import os

import transformers

PROMPTS = [
    "A photo of a red fox in the snow.",
    "a cat",
    "",
    " ",
    "   leading and trailing spaces   ",
    "repeated    spaces   between     words",
    "tabs\tand\nnewlines\r\nmixed \t \n here",
    "一只可爱的小猫坐在窗台上。",
    "中文和English混合的prompt",
    "emoji 🦊🔥 and ❤️ hearts 👍🏽",
    "accents: café, naïve, Ångström, façade, jalapeño",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ligature ﬁ",
    "a literal <extra_id_3> sentinel",
    "<extra_id_3>",
    "two sentinels <extra_id_0><extra_id_99> glued",
    "special tokens </s> and <pad> and <unk> in text",
    "Price: $12.99 (10% off)!! x",
    "UPPER lower MiXeD CaSe",
    "punctuation... ?! ;: -- — « quotes » \"double\" 'single'",
    "numbers 1234567890 3.14159 1e-5 -42",
    "hyphen-ated, under_scored, slash/separated, dot.separated",
    "https://example.com/path?query=1&b=2",
    "a ▁ metaspace char ▁▁ in text",
    "zero\u200bwidth\u200bspace and non\u00a0breaking",
    "combining e\u0301 vs precomposed é",
    "Greek αβγ Cyrillic абв Arabic مرحبا Hebrew שלום",
    "Japanese ひらがな カタカナ 漢字 and Korean 한국어",
    "math ∑∫√∞ ≤ ≥ ≠ and arrows → ←",
    "A" * 50,
    "word " * 300,
    "A highly detailed oil painting of a lighthouse on a rocky cliff at sunset, dramatic clouds, crashing waves, "
    "golden light, seagulls, photorealistic, 8k, trending on artstation, by a master painter, with a small boat "
    "in the distance and a warm glow from the lighthouse window. " * 6,
    "mixed\u3000ideographic\u3000space",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--impl", required=True, choices=["fast", "slow", "fast4"])
    a = ap.parse_args()
    tdir = os.path.join(a.pipeline, "tokenizer")
    from transformers import T5Tokenizer
    if a.impl == "slow":
        tok = T5Tokenizer.from_pretrained(tdir, legacy=True)
    elif a.impl == "fast4":
        from transformers import T5TokenizerFast
        tok = T5TokenizerFast.from_pretrained(tdir)
    else:
        tok = T5Tokenizer.from_pretrained(tdir)
    data = json.load(open(a.out)) if os.path.exists(a.out) else {"prompts": PROMPTS, "ids": {}, "versions": {}}
    assert data["prompts"] == PROMPTS
    data["ids"][a.impl] = [tok(p).input_ids for p in PROMPTS]
    data["versions"][a.impl] = f"transformers {transformers.__version__} {type(tok).__name__}"
    json.dump(data, open(a.out, "w"), ensure_ascii=False, indent=None)


if __name__ == "__main__":
    main()
