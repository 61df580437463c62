"""Write tests/data/golden/: a tiny seeded GPT-2 saved by transformers, and transformers' outputs on it.

Run by hand, never by CI (it needs torch and transformers):
    python -m venv /tmp/golden && /tmp/golden/bin/pip install torch==2.13.0 transformers numpy
    /tmp/golden/bin/python tests/make_golden.py                   # everything
    /tmp/golden/bin/python tests/make_golden.py --training-only   # only grads.npz, adamw.npz, training.json
    /tmp/golden/bin/python tests/make_golden.py --classification-only   # only classifier/ and classification.npz
The default test run then compares npgpt against these files with NumPy only.
"""

import json
import os

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
# Odd sizes on purpose: head_dim 10 and vocab 1000 are not powers of two.
CONFIG = dict(vocab_size=1000, n_positions=64, n_embd=60, n_layer=3, n_head=6, layer_norm_epsilon=1e-5)


def main():
    torch.manual_seed(1234)
    cfg = transformers.GPT2Config(**CONFIG, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        # Randomize everything: HF's init leaves LayerNorm gains at 1 and biases at 0, which would hide
        # an implementation that drops them.
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p) if p.dim() == 2 else 0.05 * torch.randn_like(p))
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)                             # model.safetensors (tied: no lm_head) + config.json
    os.remove(os.path.join(OUT, "generation_config.json"))  # not read by npgpt

    gen = np.random.default_rng(0)
    ids = gen.integers(0, CONFIG["vocab_size"], size=(2, 17))
    with torch.no_grad():
        t = torch.from_numpy(ids)
        logits = model(t).logits.numpy()                                # [2, 17, V]
        loss_row0 = model(t[:1], labels=t[:1]).loss.item()              # mean next-token cross-entropy
        greedy = t[:1]
        for _ in range(12):                                             # plain argmax loop, no generate() config
            nxt = model(greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    np.save(os.path.join(OUT, "ids.npy"), ids)
    np.save(os.path.join(OUT, "logits.npy"), logits.astype(np.float32))
    np.save(os.path.join(OUT, "greedy.npy"), greedy[0, ids.shape[1]:].numpy())
    with open(os.path.join(OUT, "outputs.json"), "w") as f:
        json.dump({"loss_row0": loss_row0, "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=2)
    print(f"wrote {OUT}: max|logit| = {np.abs(logits).max():.3f}, loss_row0 = {loss_row0:.6f}")


TRAIN = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0, steps=3)


def training():
    """transformers' labels= loss and the gradient of every parameter (dropout off), then 3 steps of
    torch.optim.AdamW with clipping at 1.0 and decay only on tensors with ndim >= 2 (nanoGPT's groups)."""
    model = transformers.GPT2LMHeadModel.from_pretrained(OUT, attn_implementation="eager").eval()   # eval: dropout off
    ids = torch.from_numpy(np.load(os.path.join(OUT, "ids.npy")))
    names = {n: n.removeprefix("transformer.") for n, _ in model.named_parameters()}   # tied head: wte only
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {names[n]: p.grad.numpy().copy() for n, p in model.named_parameters()}
    model.zero_grad()
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": TRAIN["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=TRAIN["betas"], eps=TRAIN["eps"])
    losses, norms, after = [], [], {}
    for step in range(1, TRAIN["steps"] + 1):
        opt.zero_grad()
        step_loss = model(ids, labels=ids).loss
        step_loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"]).item())
        opt.step()
        losses.append(step_loss.item())
        if step in (1, TRAIN["steps"]):
            after[step] = {f"step{step}/{names[n]}": p.detach().numpy().copy() for n, p in model.named_parameters()}
    np.savez(os.path.join(OUT, "grads.npz"), **grads)
    np.savez(os.path.join(OUT, "adamw.npz"), **after[1], **after[TRAIN["steps"]])
    with open(os.path.join(OUT, "training.json"), "w") as f:
        json.dump({"loss": loss.item(), "adamw": TRAIN, "losses": losses, "grad_norms": norms,
                   "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=2)
    print(f"wrote gradients and {TRAIN['steps']} AdamW steps: loss {loss.item():.6f}, losses {losses}")


CLS = dict(num_labels=3, pad_token_id=999, lengths=[17, 9, 13, 5], labels=[0, 2, 1, 2])


def classification():
    """GPT2ForSequenceClassification on the golden transformer with a random score head: a saved
    checkpoint (classifier/), the logits of a right-padded batch of different lengths, the loss with
    labels, and the gradient of every parameter (dropout off)."""
    torch.manual_seed(99)
    model = transformers.GPT2ForSequenceClassification.from_pretrained(
        OUT, num_labels=CLS["num_labels"], pad_token_id=CLS["pad_token_id"], attn_implementation="eager").eval()
    with torch.no_grad():
        model.score.weight.copy_(0.2 * torch.randn_like(model.score.weight))
    model.config.id2label = {i: name for i, name in enumerate(["alpha", "beta", "gamma"])}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    model.save_pretrained(os.path.join(OUT, "classifier"))
    gen = np.random.default_rng(5)
    lengths = np.array(CLS["lengths"])
    ids = np.full((len(lengths), lengths.max()), CLS["pad_token_id"])
    for i, n in enumerate(lengths):
        ids[i, :n] = gen.integers(0, CLS["pad_token_id"], n)   # no pad id inside a text: HF finds the last real token by it
    labels = torch.tensor(CLS["labels"])
    out = model(torch.from_numpy(ids), labels=labels)
    out.loss.backward()
    names = {n: n.removeprefix("transformer.") for n, _ in model.named_parameters()}
    arrays = {"ids": ids, "lengths": lengths, "labels": labels.numpy(), "logits": out.logits.detach().numpy(),
              "loss": np.array(out.loss.item())}
    arrays.update({"grad/" + names[n]: p.grad.numpy().copy() for n, p in model.named_parameters()})
    np.savez(os.path.join(OUT, "classification.npz"), **arrays)
    print(f"wrote the classifier: loss {out.loss.item():.6f}, logits {out.logits.detach().numpy().round(4).tolist()}")


if __name__ == "__main__":
    import sys

    if "--classification-only" in sys.argv:
        classification()
        sys.exit()
    if "--training-only" not in sys.argv:                  # keep the checkpoint; add only the training data
        main()
    training()
    classification()
