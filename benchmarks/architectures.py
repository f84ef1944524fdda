"""Fit cost on attention models: a small transformer (all weights) and LoRA adapters on BERT-base.

Two sections, each against one epoch of the training it stands beside, and beside
laplace-torch 0.3 (default backend, ``CurvlinopsGGN``) where it runs:

(A) **Small transformer, all weights.** Token and position embeddings (vocabulary 1,000),
    2 ``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, feed-forward 256, no dropout,
    batch-first), mean pooling, a linear head to 10 classes (166,666 parameters); 512
    sequences of 32 uniform random tokens with random labels, batch 32. Configurations:
    KFAC with the Monte-Carlo Fisher (``curvature="fisher"``, one label per datum) and
    with the exact GGN, diagonal MC Fisher and diagonal GGN:
    ``Laplace(model, "classification", subset="all", structure=..., curvature=...)``.
    laplace-torch: ``Laplace(model, "classification", subset_of_weights="all",
    hessian_structure=...)`` (``backend_kwargs={"stochastic": True}`` for the MC Fisher).
    The epoch: forward, cross-entropy (sum), backward w.r.t. all weights, every batch.
(B) **LoRA adapters on BERT-base.** ``BertForSequenceClassification(BertConfig())`` with
    random weights (hidden 768, 12 layers, 12 heads, 2 labels), peft LoRA r=8 (alpha 8, no
    dropout) on query and value, nothing else trainable (294,912 adapter parameters of
    109.8M); 256 sequences of 128 random tokens, random labels, batch 16,
    batches as dicts (input_ids, attention_mask, labels). Configurations: KFAC MC Fisher
    and KFAC GGN over the adapters: ``Laplace(model, "classification", structure="kron",
    subset="all", curvature=..., y_key="labels", call_kwargs=True, output_key="logits")``.
    laplace-torch gets the model behind the dict-taking wrapper its documentation shows
    for Hugging Face models (``forward(data) -> logits``). The epoch: one epoch of
    fine-tuning the adapters without the optimiser step: forward, cross-entropy (sum),
    backward w.r.t. the adapters only (the base is frozen).

Everything runs in eval mode (no dropout), 2 torch threads, ``OMP_WAIT_POLICY=PASSIVE``.
Targets, each printed as met / NOT met: (A) all-weights MC-Fisher KFAC <= 2x the epoch;
(B) LoRA-adapter KFAC (each curvature) <= 1.5x the epoch; in every configuration where
laplace-torch runs, laplacefim's peak resident memory <= laplace-torch's.

Measurement. Every (library, configuration) and each epoch runs in its own process forked
from a fork server that has imported torch, laplacefim, transformers, peft and
laplace-torch (``memory.py``'s helpers). In it, after the model and data are built: a fit
over the first batch (cold: lazy set-up), the same again (warm), whose time x the number
of batches projects the full run (beyond ``--cap`` the row says ``skipped``); one untimed
full warm-up run when the projection is under 2 s; then timed full runs, the median of
``--repeats`` (one run only when the first takes over 10 s). A timed run is construction
+ ``fit(loader)`` (no prior tuning; laplace-torch's ``KronLaplace.fit`` also
eigendecomposes its factors, ours decomposes lazily: small here, at most 768x768 and
256x256 factors). ``peak`` is the process's ``ru_maxrss``; ``dRSS`` that minus its RSS
once model and data were built. Each process runs under an address-space budget
(``--budget-mb``) and an RSS guard; failures are reported with the error.

The full run was not timed on this machine; expect tens of minutes on 2 cores, mostly (B)
(one BERT-base epoch of 16 batches takes minutes there; rows over 10 s run once).
Section (B) needs ``transformers`` and ``peft``; ``setup_bench_env.sh`` does not install them:
``.venv-bench/bin/pip install -c <(echo torch==2.13.0) transformers peft``.

Usage (from the repository root; laplace-torch lives in the benchmark environment)::

    .venv-bench/bin/python benchmarks/architectures.py --json /tmp/architectures.json
    .venv-bench/bin/python benchmarks/architectures.py --quick            # smoke, < 2 min
    .venv/bin/python benchmarks/architectures.py --quick --libs ours --only A
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from memory import (  # also sets OMP_WAIT_POLICY and sys.path before torch loads
    Meter,
    fmt_load,
    fnum,
    fork_server,
    header,
    run_job,
    table,
)

SEED = 0
LIBS = ("ours", "laplace")
LIB_NAMES = {"epoch": "epoch", "ours": "laplacefim", "laplace": "laplace-torch"}
SLOW_S = 10.0  # a first timed run longer than this is not repeated
FULL_WARMUP_S = 2.0  # projected runs shorter than this get one untimed full warm-up run

SIZES: dict[str, dict[bool, dict[str, Any]]] = {  # section -> quick -> sizes
    "A": {
        False: dict(vocab=1000, d_model=64, heads=4, ff=256, layers=2, seq=32, n=512, batch=32),
        True: dict(vocab=100, d_model=32, heads=2, ff=64, layers=2, seq=16, n=64, batch=32),
    },
    "B": {
        False: dict(bert={}, seq=128, n=256, batch=16, rank=8),
        True: dict(
            bert=dict(
                vocab_size=1000,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                max_position_embeddings=64,
            ),
            seq=32,
            n=32,
            batch=16,
            rank=8,
        ),
    },
}
CLASSES_A = 10
# (structure, curvature) per section; the target each section's rows are held to.
CONFIGS = {
    "A": [("kron", "fisher"), ("kron", "ggn"), ("diag", "fisher"), ("diag", "ggn")],
    "B": [("kron", "fisher"), ("kron", "ggn")],
}
TIME_TARGETS = {"A": ({("kron", "fisher")}, 2.0), "B": ({("kron", "fisher"), ("kron", "ggn")}, 1.5)}
TITLES = {
    "A": "small transformer (2 nn.TransformerEncoderLayer), all weights",
    "B": "BERT-base (random weights) + peft LoRA r=8 on query/value, adapters only",
}

# ---------------------------------------------------------------- workloads


def build_a(sizes: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The small transformer (eval mode) and its data as ``(ids, labels)`` batches' tensors."""
    import torch
    from torch import nn

    class TokenTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = sizes["d_model"]
            self.embed = nn.Embedding(sizes["vocab"], d)
            self.pos = nn.Embedding(sizes["seq"], d)
            self.encoder = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    d, sizes["heads"], sizes["ff"], dropout=0.0, batch_first=True
                )
                for _ in range(sizes["layers"])
            )
            self.head = nn.Linear(d, CLASSES_A)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            x = self.embed(ids) + self.pos(positions)
            for layer in self.encoder:
                x = layer(x)
            return self.head(x.mean(1))

    torch.manual_seed(SEED)
    model = TokenTransformer().eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, sizes["vocab"], (sizes["n"], sizes["seq"]), generator=gen)
    labels = torch.randint(0, CLASSES_A, (sizes["n"],), generator=gen)
    return model, [ids, labels]


def build_b(sizes: dict[str, Any]) -> tuple[Any, list[Any]]:
    """BERT + peft LoRA (eval mode, only the adapters trainable) and its data as dict rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    config = BertConfig(**sizes["bert"])  # num_labels 2 by default
    lora = LoraConfig(
        r=sizes["rank"], lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]
    )
    model = get_peft_model(BertForSequenceClassification(config), lora).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, config.vocab_size, (sizes["n"], sizes["seq"]), generator=gen)
    labels = torch.randint(0, config.num_labels, (sizes["n"],), generator=gen)
    rows = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": t}
        for i, t in zip(ids, labels, strict=True)
    ]
    return model, rows


def loaders(section: str, data: list[Any], batch: int) -> tuple[Any, Any]:
    """The full loader and the loader over the first batch only (no shuffling)."""
    from torch.utils.data import DataLoader, TensorDataset

    if section == "A":
        ids, labels = data
        return (
            DataLoader(TensorDataset(ids, labels), batch_size=batch),
            DataLoader(TensorDataset(ids[:batch], labels[:batch]), batch_size=batch),
        )
    return DataLoader(data, batch_size=batch), DataLoader(data[:batch], batch_size=batch)


def make_run(section: str, lib: str, structure: str | None, curvature: str | None, model: Any):
    """The callable ``run(loader)`` that is timed: an epoch, or construction + fit."""
    import torch
    from torch import nn

    if lib == "epoch":

        def epoch(loader: Any) -> None:
            for batch in loader:
                model.zero_grad(set_to_none=True)
                if section == "A":
                    logits, y = model(batch[0]), batch[1]
                else:
                    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                    logits, y = model(**inputs).logits, batch["labels"]
                nn.functional.cross_entropy(logits, y, reduction="sum").backward()

        return epoch
    if lib == "ours":
        from laplacefim import Laplace

        io = {} if section == "A" else dict(y_key="labels", call_kwargs=True, output_key="logits")

        def ours(loader: Any) -> None:
            la = Laplace(
                model,
                "classification",
                subset="all",
                structure=structure,
                curvature=curvature,
                **io,
            )
            la.fit(loader, generator=torch.Generator().manual_seed(SEED))

        return ours
    import laplace

    net = model
    if section == "B":  # laplace-torch calls model(batch) with the whole mapping

        class DictModel(nn.Module):
            def __init__(self, hf: nn.Module) -> None:
                super().__init__()
                self.hf = hf

            def forward(self, data: Any) -> torch.Tensor:
                return self.hf(
                    input_ids=data["input_ids"], attention_mask=data["attention_mask"]
                ).logits

        net = DictModel(model).eval()
    kwargs = {"backend_kwargs": {"stochastic": True}} if curvature == "fisher" else {}

    def theirs(loader: Any) -> None:
        la = laplace.Laplace(
            net,
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
            **kwargs,
        )
        la.fit(loader)

    return theirs


# ---------------------------------------------------------------- the job process


def _timed(run: Callable[[Any], None], loader: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    run(loader)
    return time.perf_counter() - start


def job(
    section: str,
    lib: str,
    structure: str | None,
    curvature: str | None,
    quick: bool,
    repeats: int,
    cap_s: float,
    budget_mb: float,
) -> dict[str, Any]:
    """Build the workload, probe on the first batch, then time full runs (see the docstring)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    sizes = SIZES[section][quick]
    model, data = (build_a if section == "A" else build_b)(sizes)
    loader, first = loaders(section, data, sizes["batch"])
    n_batches = len(loader)
    torch.manual_seed(SEED)  # laplace-torch draws its MC labels from the global generator
    meter = Meter(budget_mb)
    with meter.measure() as result:
        run = make_run(section, lib, structure, curvature, model)
        cold = _timed(run, first)
        warm = _timed(run, first)
        projected = warm * n_batches
        result.update(cold_s=cold, warm_s=warm, projected_s=projected, n_batches=n_batches)
        if projected > cap_s:
            result.update(
                status="skipped", detail=f"projected {projected:.0f} s > cap {cap_s:.0f} s"
            )
        else:
            if projected < FULL_WARMUP_S:
                run(loader)
            times = [_timed(run, loader)]
            while len(times) < repeats and times[0] <= SLOW_S:
                times.append(_timed(run, loader))
            result.update(time_s=statistics.median(times), times=times)
    result["n_params"] = sum(p.numel() for p in model.parameters())
    result["n_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return meter.result


# ---------------------------------------------------------------- orchestration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run (< 2 min)")
    p.add_argument("--only", choices=["A", "B"], help="run one section only")
    p.add_argument("--libs", default="ours,laplace", help="comma list of ours,laplace")
    p.add_argument(
        "--repeats", type=int, help="timed runs per row (median; 1 when a run takes over 10 s); 3"
    )
    p.add_argument("--cap", type=float, help="seconds per row; 900, or 30 with --quick")
    p.add_argument("--budget-mb", type=float, default=10 * 1024)
    p.add_argument("--rss-guard-mb", type=float, default=12 * 1024)
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    args.libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    unknown = [lib for lib in args.libs if lib not in LIBS]
    if unknown:
        p.error(f"unknown libraries {unknown}; choose from {list(LIBS)}")
    args.repeats = args.repeats or 3
    args.cap = args.cap or (30.0 if args.quick else 900.0)
    return args


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def report(section: str, records: list[dict[str, Any]], quick: bool) -> tuple[str, list[str]]:
    """The section's table and its target lines."""
    mine = [r for r in records if r["section"] == section]
    epoch = next((r for r in mine if r["lib"] == "epoch"), {})
    epoch_s = epoch.get("time_s")
    sizes = SIZES[section][quick]
    some = next((r for r in mine if "n_params" in r), {})
    lines = [
        f"== ({section}) {TITLES[section]}",
        f"   sizes {sizes}; {fnum(some.get('n_params'))} parameters, "
        f"{fnum(some.get('n_trainable'))} trainable",
        f"   epoch: {_fmt_s(epoch_s)} s ({epoch.get('status', 'missing')}, "
        f"{len(epoch.get('times', []))} timed run(s)), dRSS {fnum(epoch.get('drss_mb'))} MB, "
        f"peak {fnum(epoch.get('rss_peak_mb'))} MB",
        "",
    ]
    rows = []
    for r in mine:
        if r["lib"] == "epoch":
            continue
        ratio = _ratio(r.get("time_s"), epoch_s)
        rows.append(
            [
                r["structure"],
                r["curvature"],
                LIB_NAMES[r["lib"]],
                r["status"],
                _fmt_s(r.get("time_s")),
                "-" if ratio is None else f"{ratio:.2f}",
                fnum(r.get("drss_mb")),
                fnum(r.get("rss_peak_mb")),
                (r.get("detail") or "").splitlines()[0][:110] if r.get("detail") else "",
            ]
        )
    heads = ["struct", "curvature", "library", "status", "time[s]", "/epoch", "dRSS[MB]"]
    lines.append(table(rows, [*heads, "peak[MB]", "note"]) if rows else "(no rows)")
    targets = []
    configs, limit = TIME_TARGETS[section]
    for structure, curvature in CONFIGS[section]:
        by = {
            r["lib"]: r for r in mine if r["structure"] == structure and r["curvature"] == curvature
        }
        ours, theirs = by.get("ours"), by.get("laplace")
        name = f"({section}) {structure} {curvature}"
        if (structure, curvature) in configs and ours is not None:
            ratio = _ratio(ours.get("time_s"), epoch_s)
            verdict = "n/a" if ratio is None else "met" if ratio <= limit else "NOT met"
            shown = "-" if ratio is None else f"{ratio:.2f}"
            targets.append(f"{name}: fit / epoch = {shown} (target <= {limit}): {verdict}")
        if ours is not None and theirs is not None:
            if ours["status"] == "ok" and theirs["status"] == "ok":
                a, b = ours["rss_peak_mb"], theirs["rss_peak_mb"]
                verdict = "met" if round(a) <= round(b) else "NOT met"  # at MB resolution
                targets.append(
                    f"{name}: peak memory ours {a:,.0f} MB vs laplace-torch {b:,.0f} MB (dRSS "
                    f"{ours['drss_mb']:,.0f} vs {theirs['drss_mb']:,.0f} MB; target: never "
                    f"more): {verdict}"
                )
            elif theirs["status"] != "ok":
                targets.append(
                    f"{name}: peak memory: n/a (laplace-torch {theirs['status']}: "
                    f"{(theirs.get('detail') or '').splitlines()[0][:90] if theirs.get('detail') else ''})"
                )
    return "\n".join(lines), targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    notes = []
    libs = list(args.libs)
    if "laplace" in libs and importlib.util.find_spec("laplace") is None:
        libs.remove("laplace")
        notes.append(
            f"laplace-torch is not importable in {sys.prefix}: its rows are skipped "
            "(run in .venv-bench, see benchmarks/setup_bench_env.sh)"
        )
    sections = [args.only] if args.only else ["A", "B"]
    if "B" in sections and not all(importlib.util.find_spec(m) for m in ("transformers", "peft")):
        sections.remove("B")
        notes.append(
            "transformers or peft is not importable: section B is skipped (install them with "
            "`pip install -c <(echo torch==2.13.0) transformers peft`)"
        )
    hf = "  ".join(f"{d} {_version(d)}" for d in ("transformers", "peft"))
    meta = header("laplacefim architectures benchmark: transformer and LoRA fits", f"# {hf}")
    for note in notes:
        print(f"# note: {note}")
        print(f"note: {note}", file=sys.stderr)
    preload = [
        "torch",
        "laplacefim",
        "transformers",
        "transformers.models.bert.modeling_bert",
        "peft",
    ]
    ctx = fork_server([*preload, *(["laplace", "laplace.curvature"] if "laplace" in libs else [])])
    records: list[dict[str, Any]] = []
    for section in sections:
        jobs: list[tuple[str, str | None, str | None]] = [("epoch", None, None)]
        jobs += [(lib, s, c) for s, c in CONFIGS[section] for lib in libs]
        for lib, structure, curvature in jobs:
            label = f"({section}) {LIB_NAMES[lib]} {structure or ''} {curvature or ''}".strip()
            print(f"[architectures] {label} ...", file=sys.stderr, flush=True)
            kwargs = dict(
                section=section,
                lib=lib,
                structure=structure,
                curvature=curvature,
                quick=args.quick,
                repeats=args.repeats,
                cap_s=args.cap,
                budget_mb=args.budget_mb,
            )
            res = run_job(
                ctx,
                "architectures",
                "job",
                kwargs,
                cap_s=2 * args.cap + 60,
                rss_guard_mb=args.rss_guard_mb,
            )
            res.update(section=section, lib=lib, structure=structure, curvature=curvature)
            records.append(res)
            print(
                f"[architectures]   -> {res.get('status')} {_fmt_s(res.get('time_s'))} s "
                f"(process {res.get('wall_s', 0):.1f} s) {(res.get('detail') or '')[:120]}",
                file=sys.stderr,
                flush=True,
            )
    all_targets = []
    for section in sections:
        text, targets = report(section, records, args.quick)
        print(f"\n{text}")
        all_targets += targets
    print("\nTargets" + (" (--quick sizes: indicative only)" if args.quick else ""))
    print("\n".join(f"  {t}" for t in all_targets) if all_targets else "  (none evaluated)")
    meta["loadavg_end"] = list(os.getloadavg())
    total = time.perf_counter() - started
    print(
        f"\n# total wall time {total:.0f} s; load average at start "
        f"{fmt_load(meta['loadavg_start'])}, at end {fmt_load(meta['loadavg_end'])}"
    )
    if args.json:
        for r in records:
            r.pop("traceback", None)
        meta["versions"].update({d: _version(d) for d in ("transformers", "peft")})
        payload = {
            "meta": meta,
            "args": vars(args) | {"json": str(args.json)},
            "sizes": {s: SIZES[s][args.quick] for s in sections},
            "notes": notes,
            "results": records,
            "targets": all_targets,
            "total_s": total,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
