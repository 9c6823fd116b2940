"""Peak host memory of two update steps of a random Qwen3 model on CPU, for tests/test_plan.py.

Run as a script (a fresh process: its RSS high-water mark is the update's): prints {"peak", "params"} with the
peak growth of resident memory over the process's size before the model was built.
argv: V H layers heads kv_heads head_dim intermediate sequences prompt_len response_len
"""
import json
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from opd.engines.forward import response_hidden


def rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))


torch.set_num_threads(1)
V, H, L, nh, kv, hd, I, B, P, R = map(int, sys.argv[1:11])
base = rss("VmRSS")
torch.manual_seed(0)
model = Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=nh,
    num_key_value_heads=kv, head_dim=hd, intermediate_size=I, tie_word_embeddings=True))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(B)]
responses = [torch.randint(0, V, (R,), generator=g).tolist() for _ in range(B)]
tokens = torch.tensor([t for r in responses for t in r])
for _ in range(2):
    logits = model.lm_head(response_hidden(model, prompts, responses))  # unchunked: the planner's null chunk
    logp = torch.log_softmax(logits.float(), -1)
    loss = -logp.gather(-1, tokens[:, None]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    del logits, logp, loss
print(json.dumps({"peak": rss("VmHWM") - base, "params": sum(p.numel() for p in model.parameters())}))
