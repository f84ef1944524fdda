"""Laplace-LoRA: a Laplace posterior over the LoRA adapters of a small transformer.

Laplace-LoRA (Yang et al., 2024) fine-tunes a pretrained transformer with low-rank
adapters and puts a Kronecker-factored Laplace posterior over the adapters alone. Here the
digits of scikit-learn become token sequences ([CLS] + 16 tokens, one per 2x2 patch, its
ink quantised to 8 levels). A small BERT is pretrained on digits 0-4 (the stand-in for a
pretrained checkpoint), frozen, and given LoRA adapters (r=4) on its query and value
projections; the adapters and a classifier head are fine-tuned on digits 5-9. Then
``Laplace(..., structure="kron", subset="all")`` takes exactly the trainable parameters,
its prior is tuned by marginal likelihood, and MAP and the GLM probit predictive are
compared on held-out digits 5-9, on the same digits with 30% of their tokens replaced at
random, and as detectors of unseen digits 0-4 (AUROC of the max probability).

With ``transformers`` and ``peft`` installed the model is a ``BertForSequenceClassification``
with peft's LoRA; without them, or with ``--no-peft``, a small pre-LN transformer with the
``LoRALinear`` adapters written below. Everything is seeded with local generators.

Run: ``python examples/lora_transformer.py [--no-peft]`` (about 15-30 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # keeps 2-thread torch fast under load

import torch
from _smoke import size
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplacefim import Laplace, metrics

D_MODEL, LAYERS, HEADS, RANK, ALPHA, LEVELS, SEQ = 64, 2, 4, 4, 8, 8, 17


def digit_tokens() -> tuple[Tensor, Tensor]:
    """Digits as token ids ``(N, 17)``: [CLS]=1, then 2 + the quantised ink of each 2x2 patch."""
    X, y = load_digits(return_X_y=True)
    ink = torch.tensor(X).reshape(-1, 4, 2, 4, 2).sum((2, 4)).reshape(-1, 16)  # 0..64
    tokens = (ink * LEVELS / 65).long() + 2
    return torch.cat([torch.ones(len(y), 1, dtype=torch.long), tokens], 1), torch.tensor(y)


def corrupt(ids: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Replace ``fraction`` of the patch tokens by random levels (the shifted split)."""
    hit = torch.rand(ids.shape, generator=generator) < fraction
    hit[:, 0] = False
    noise = torch.randint(2, 2 + LEVELS, ids.shape, generator=generator)
    return torch.where(hit, noise, ids)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) B(A(x))`` with ``base`` frozen and ``B`` starting at zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)  # as peft: A as nn.Linear's default, B = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class Block(nn.Module):
    """Pre-LN encoder block with separate query / key / value projections."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(D_MODEL, D_MODEL) for _ in "qkvo")
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.ffn = nn.Sequential(
            nn.Linear(D_MODEL, 2 * D_MODEL), nn.GELU(), nn.Linear(2 * D_MODEL, D_MODEL)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        q, k, v = (
            f(h).unflatten(-1, (HEADS, -1)).transpose(1, 2)
            for f in (self.query, self.key, self.value)
        )
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(a.transpose(1, 2).flatten(2))
        return x + self.ffn(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token + position embeddings, pre-LN blocks, a head on [CLS]; HF-style call and output."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(2 + LEVELS, D_MODEL), nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.classifier = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        x = self.embed(input_ids) + self.pos.weight[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, attention_mask.bool())
        return {"logits": self.classifier(self.norm(x[:, 0]))}


def seeded_init(module: nn.Module, generator: torch.Generator) -> None:
    """BERT-style initialisation: N(0, 0.02²) weights, zero biases, unit norm scales."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(float("norm" in name.lower() and name.endswith("weight")))


def build(use_peft: bool, generator: torch.Generator) -> nn.Module:
    """The model to pretrain: a small HF BERT (no dropout) or the plain-torch transformer."""
    model: nn.Module = TinyTransformer(num_labels=5)
    if use_peft:
        from transformers import BertConfig, BertForSequenceClassification

        sizes = dict(hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
        config = BertConfig(vocab_size=2 + LEVELS, intermediate_size=2 * D_MODEL, **sizes,
                            max_position_embeddings=SEQ, num_labels=5, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
        model = BertForSequenceClassification(config)
    seeded_init(model, generator)
    return model


def add_adapters(model: nn.Module, use_peft: bool, generator: torch.Generator) -> nn.Module:
    """Freeze the pretrained model; LoRA on query and value; a fresh trainable head."""
    seeded_init(model.classifier, generator)
    if use_peft:
        from peft import LoraConfig, get_peft_model

        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")

        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="SEQ_CLS",
                          target_modules=["query", "value"])  # fmt: skip
        model = get_peft_model(model, lora)  # freezes all but the adapters and the head
        for name, p in model.named_parameters():
            if "lora_A" in name:  # peft's initialisation, re-drawn from the local generator
                nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
        return model
    model.requires_grad_(False)
    for block in model.blocks:
        block.query = LoRALinear(block.query, RANK, ALPHA, generator)
        block.value = LoRALinear(block.value, RANK, ALPHA, generator)
    model.classifier.requires_grad_(True)
    return model


def as_inputs(ids: Tensor) -> dict[str, Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loader(ids: Tensor, y: Tensor, generator: torch.Generator) -> DataLoader:
    """Shuffled batches of 32 as dicts with input_ids, attention_mask and labels (HF style)."""
    rows = [{**as_inputs(i), "labels": t} for i, t in zip(ids, y, strict=True)]
    return DataLoader(rows, batch_size=32, shuffle=True, generator=generator)


def train(model: nn.Module, data: DataLoader, epochs: int, lr: float) -> None:
    """Adam on the mean cross-entropy, trainable parameters only."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            nn.functional.cross_entropy(logits["logits"], batch["labels"]).backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-peft", action="store_true", help="use the plain-torch LoRA model")
    have_hf = all(importlib.util.find_spec(m) for m in ("transformers", "peft"))
    use_peft = have_hf and not parser.parse_args().no_peft
    torch.set_num_threads(2)
    start, gen = time.perf_counter(), torch.Generator().manual_seed(0)
    ids, y = digit_tokens()
    source, target = ids[y < 5], ids[y >= 5]
    labels = y[y >= 5] - 5
    perm = torch.randperm(len(labels), generator=gen)
    train_rows, test_rows = perm[:600], perm[600:]

    model = build(use_peft, gen)
    train(model, loader(source, y[y < 5], gen), epochs=size(25, 1), lr=3e-3)  # "pretraining"
    model = add_adapters(model, use_peft, gen)
    train_loader = loader(target[train_rows], labels[train_rows], gen)
    train(model, train_loader, epochs=size(20, 1), lr=1e-2)  # fine-tuning adapters and head
    n_total = sum(p.numel() for p in model.parameters())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    n_lora = sum(v for n, v in trainable.items() if "lora_" in n)
    kind = "HF BERT + peft LoRA" if use_peft else "torch transformer + LoRALinear"
    print(f"{kind}: {n_total:,} parameters; trainable: {n_lora:,} in LoRA adapters, "
          f"{sum(trainable.values()) - n_lora:,} in the classifier head")  # fmt: skip

    # subset="all" takes the parameters with requires_grad=True: the adapters and the head.
    la = Laplace(model, "classification", structure="kron", subset="all", y_key="labels",
                 call_kwargs=True, output_key="logits")  # fmt: skip
    la.fit(train_loader)
    prior = float(la.tune_prior().prior_precision)
    print(f"Laplace over {la.n_params:,} parameters; prior precision tuned to {prior:.3g}")

    splits = {  # held-out digits 5-9, the same with 30% of their tokens replaced, digits 0-4
        "held-out": target[test_rows],
        "30% noise": corrupt(target[test_rows], 0.3, torch.Generator().manual_seed(1)),
        "OOD": source[:400],
    }
    probs: dict[str, dict[str, Tensor]] = {"MAP": {}, "Laplace": {}}
    for name, split in splits.items():
        with torch.no_grad():
            probs["MAP"][name] = model(**as_inputs(split))["logits"].softmax(-1)
        probs["Laplace"][name] = la.predict(as_inputs(split)).probs  # GLM, probit link

    t = labels[test_rows]
    print(f"\n{'':8}{'split':>10}{'acc ↑':>8}{'NLL ↓':>8}{'ECE ↓':>8}  AUROC ↑ vs digits 0-4")
    for method, p in probs.items():
        conf = {k: metrics.max_probability(v) for k, v in p.items()}
        auroc = f"{metrics.ood_auroc(conf['held-out'], conf['OOD']):10.3f}"
        for i, name in enumerate(["held-out", "30% noise"]):
            scores = [f(p[name], t) for f in (metrics.accuracy, metrics.nll, metrics.ece)]
            row = "".join(f"{v:8.3f}" for v in scores) + (auroc if i == 0 else "")
            print(f"{method if i == 0 else '':8}{name:>10}{row}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
