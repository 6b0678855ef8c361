#!/usr/bin/env python3
"""Make fixtures/tiny_bert: a small randomly initialised BERT and what Hugging Face transformers computes
with it, for the embedding_check forward-pass test (tests/embedding_check.rs).

Writes config.json, model.safetensors (BF16 weights, names with the "bert." prefix of task checkpoints) and
expected.json (token ids from transformers' BertTokenizer with fixtures/tiny_bert/vocab.txt, which is written
by hand and only read here; last hidden states of BertModel on a padded batch with an attention mask, from
the BF16 weights upcast to f32; mean-pooled, L2-normalized sentence embeddings). Seeded: a rerun with the same
torch version gives the same files.

    python3 scripts/make_tiny_bert.py [--out fixtures/tiny_bert]
"""

import argparse
import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent

SENTENCES = [
    "The cat sat on the mat.",
    "A big red dog ran over the river!",
    "Unhappiness",
    "The old café was quiet, and the birds sang.",
    "Players jumped (10 of them) near 12 houses?",
    "中文 and the moon",
    "Sun",
    "the small blue fish swam under the old house near the river and the green tree in the rain and the sun",
]
MAX_SEQ_LEN = 24


def significant(x, digits=8):
    return float(f"{x:.{digits}g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "fixtures" / "tiny_bert")
    args = parser.parse_args()
    vocab_path = args.out / "vocab.txt"
    vocab_size = len(vocab_path.read_text(encoding="utf-8").splitlines())

    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_SEQ_LEN, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(20261122)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    # Larger than BERT's init so that GELU, softmax and every LayerNorm parameter matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "LayerNorm.bias" in name or name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embeddings" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())

    tokenizer = transformers.BertTokenizer(str(vocab_path), do_lower_case=True)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)

    lengths = batch["attention_mask"].sum(1).tolist()
    expected = {
        "made_by": f"scripts/make_tiny_bert.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "max_seq_len": MAX_SEQ_LEN,
        "sentences": SENTENCES,
        "token_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
        "hidden_states": [[significant(v) for v in states[i, :n].flatten().tolist()]
                          for i, n in enumerate(lengths)],
        "embeddings": [[significant(v) for v in e.tolist()] for e in embeddings],
    }
    tensors = {f"bert.{k}": v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
               if not k.endswith("position_ids")}
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(config.to_json_string(use_diff=False))
    (args.out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {sum(t.numel() for t in tensors.values())} weights, lengths {lengths}")


if __name__ == "__main__":
    main()
