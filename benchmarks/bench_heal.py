"""Benchmark the heal: seconds per optimizer step of reg=nll vs reg=kl_rev, and the memory of
masked vs full-vocab log_softmax.

    .venv/bin/python benchmarks/bench_heal.py [--records 48] [--batch 4] [--tokens 80]

Same model (the embedded SmolLM2 on the default preset), same completions (prompt-pool prompts +
random-token completions), LoRA r16 on the default heal band. A whole `heal.heal` per variant,
one after the other in this process: nll; kl_rev with tau 0 (the barrier fires on every step)
with the gradient split as configured (every heal_grad_every-th step), on every step, and never.
Peak memory per variant in a fresh subprocess each (peak RSS over the RSS sampled every
millisecond, over the RSS after set-up, so both carry the same weights). Nothing gates on these
numbers.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mb():
    """Current resident set size (ru_maxrss is a lifetime peak, dominated by loading the model)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """Sample RSS every millisecond in a thread; .peak is the highest seen."""

    def __enter__(self):
        import threading
        self.peak, self._stop = rss_mb(), threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb())
                self._stop.wait(0.001)
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def setup(batch, tokens, **overrides):
    import torch
    from shl import heal, history
    from shl.demos import load_demo
    from shl.models import chat_prompt, load_model
    from shl.params import load_params

    p = load_params("default", **overrides)
    model, tok = load_model(p.model, p.dtype, "cpu")
    demo = load_demo(p)
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(batch):
        ids = torch.randint(200, 20000, (tokens,), generator=g).tolist()
        records.append({"chat_prompt": chat_prompt(tok, demo.prompt_pool[i]), "completion": tok.decode(ids)})
    model = history.add_round_adapter(model, p, 0)
    with torch.no_grad():  # a non-zero adapter, so the student differs from the reference
        for A, B, _ in history.lora_pairs(model, "r0"):
            B.normal_(0, 0.02)
    batch_t = heal.collate(heal.encode_records(tok, records), tok.pad_token_id)
    return p, model, batch_t


def one_step(p, model, batch):
    """One micro-batch's loss and gradient of the total (the memory probe; `heal_seconds` times
    the real training loop)."""
    from shl import heal
    ref = heal.batch_frozen_states(model, batch, [], 0)[0] if p.reg != "nll" else None
    t = heal.heal_loss(model, batch, p, 0, "r0", ref)
    t["total"].backward()
    return t["D"].item()


def heal_seconds(reg, batch, tokens, records_n, **overrides):
    """Seconds per optimizer step of a whole `heal.heal` (the reference states it computes first
    included) on `records_n` completions, and the step count."""
    import torch
    from shl import heal
    from shl.demos import load_demo
    from shl.models import chat_prompt, load_model
    from shl.params import load_params
    p = load_params("default", reg=reg, train_batch_size=batch, **overrides)
    model, tok = load_model(p.model, p.dtype, "cpu")
    demo = load_demo(p)
    g = torch.Generator().manual_seed(0)
    records = [{"chat_prompt": chat_prompt(tok, demo.prompt_pool[i % len(demo.prompt_pool)]),
                "completion": tok.decode(torch.randint(200, 20000, (tokens,), generator=g).tolist())}
               for i in range(records_n)]
    _, log = heal.heal(model, tok, records, p, round_idx=0, history=[], progress=False)
    return log["seconds"] / len(log["steps"]), len(log["steps"])


def child(kind, batch, tokens):
    """Peak RSS of one step (kind: nll, kl_rev) or of the log-softmax alone (masked, full)."""
    p, model, b = setup(batch, tokens, reg="kl_rev" if kind in ("kl_rev", "masked", "full") else "nll", tau=0.0)
    import gc
    gc.collect()
    base = rss_mb()
    with PeakRss() as peak:
        work(kind, p, model, b)
    print(json.dumps({"kind": kind, "peak_mb": peak.peak - base}))


def work(kind, p, model, b):
    if kind in ("nll", "kl_rev"):
        one_step(p, model, b)
    else:
        from shl import heal, history
        if kind == "masked":
            logp = heal.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        else:  # the naive way: full [B, L, V] logits and log_softmax, then select
            logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().log_softmax(-1)
            logp = logp[:, :-1][b["loss_mask"][:, 1:].bool()]
        logp.sum().backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=48, help="training completions (default: n_keep)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--epochs", type=int, default=2, help="passes per heal (the default preset's 6 takes 3x as long)")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.batch, args.tokens)
    n = args.records
    e = args.epochs
    t_nll, steps = heal_seconds("nll", args.batch, args.tokens, n, epochs=e)
    t_kl, _ = heal_seconds("kl_rev", args.batch, args.tokens, n, tau=0.0, epochs=e)
    t_kl_every, _ = heal_seconds("kl_rev", args.batch, args.tokens, n, tau=0.0, heal_grad_every=1, epochs=e)
    t_kl_off, _ = heal_seconds("kl_rev", args.batch, args.tokens, n, tau=0.0, heal_grad_norms=False, epochs=e)
    print(f"heal, {n} completions of {args.tokens} tokens, micro-batch {args.batch}, {steps} optimizer steps; "
          f"seconds per step: reg=nll {t_nll:.2f}; reg=kl_rev (barrier firing every step) {t_kl:.2f} "
          f"({t_kl / t_nll:.2f}x nll) measuring the gradient's terms on every heal_grad_every-th step (default), "
          f"{t_kl_every:.2f} ({t_kl_every / t_nll:.2f}x) measuring on every step, "
          f"{t_kl_off:.2f} ({t_kl_off / t_nll:.2f}x) never measuring")
    mem = {}
    for kind in ("nll", "kl_rev", "masked", "full"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
                              "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
        mem[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    print(f"peak memory over set-up: step reg=nll {mem['nll']:.0f} MB, reg=kl_rev {mem['kl_rev']:.0f} MB")
    print(f"log-softmax + backward: completion positions selected first {mem['masked']:.0f} MB, "
          f"full [B, L, V] {mem['full']:.0f} MB, saving {mem['full'] - mem['masked']:.0f} MB "
          f"({mem['full'] / max(mem['masked'], 1):.1f}x)")


if __name__ == "__main__":
    main()
