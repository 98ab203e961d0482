"""The project's own text data: persona pairs, demo prompts, prompt pools, extraction contexts.

Each demo is a YAML file under shl/data/demos/ (pos/neg system prompts that are direct
opposites on one axis, the eval foundation the trait moves and its direction, fixed demo prompts
compared across rounds, and a pool of prompts where the trait shows in behaviour). Extraction
contexts are everyday user messages, one per line, in shl/data/contexts.txt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shl.params import EMBEDDED, FOUNDATIONS, TINY, ParamError, Params

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class Demo:
    name: str
    pos: str  # system prompt of the trait
    neg: str  # its direct opposite
    trait_foundation: str  # e.g. "authority"
    trait_sign: int  # -1: trait = that foundation's nats going down
    demo_prompts: list[str]
    prompt_pool: list[str]
    narration: list[str] = field(default_factory=list)  # phrases that narrate the persona (filter)
    # foundations the persona pair also names, with their direction (authority: care up); shown
    # beside selectivity, never part of the trait
    companions: dict[str, int] = field(default_factory=dict)

    def trait_move(self, nats: float, base_nats: float) -> float:
        """Change of the trait foundation vs base, signed so that positive = toward the trait."""
        return self.trait_sign * (nats - base_nats)


def demo_names() -> list[str]:
    return sorted(p.stem for p in (DATA / "demos").glob("*.yaml"))


def load_demo(p: Params) -> Demo:
    """The demo named by `p.demo`, with any persona / trait overrides from params applied."""
    path = DATA / "demos" / f"{p.demo}.yaml"
    if not path.exists():
        raise ParamError(f"unknown demo '{p.demo}': use one of {demo_names()}")
    d = yaml.safe_load(path.read_text())
    demo = Demo(name=p.demo, pos=p.persona_pos or d["pos"], neg=p.persona_neg or d["neg"],
                trait_foundation=p.trait_foundation or d["trait_foundation"],
                trait_sign=p.trait_sign or int(d["trait_sign"]),
                demo_prompts=list(d["demo_prompts"]), prompt_pool=list(d["prompt_pool"]),
                narration=list(d.get("narration_phrases", [])), companions=dict(d.get("companions") or {}))
    if demo.trait_foundation not in FOUNDATIONS or demo.trait_sign not in (-1, 1):
        raise ParamError(f"{path}: trait_foundation must be one of {FOUNDATIONS} and trait_sign -1 or 1")
    if p.trait_foundation or p.persona_pos:  # companions belong to the demo's own pair and trait
        demo.companions = {}
    if any(f not in FOUNDATIONS or f == demo.trait_foundation or s not in (-1, 1) for f, s in demo.companions.items()):
        raise ParamError(f"{path}: companions must map other foundations to -1 or 1, got {demo.companions}")
    return demo


def load_contexts(p: Params) -> list[str]:
    """The first `n_contexts` extraction contexts (one per line; blank and # lines skipped)."""
    path = Path(p.contexts_file) if p.contexts_file else DATA / "contexts.txt"
    if not path.exists():
        raise ParamError(f"contexts_file {path} does not exist")
    lines = [s.strip() for s in path.read_text().splitlines()]
    contexts = [s for s in lines if s and not s.startswith("#")]
    if not contexts:
        raise ParamError(f"contexts_file {path} holds no contexts (one user message per line)")
    if len(contexts) < p.n_contexts:
        raise ParamError(f"contexts_file {path} holds {len(contexts)} contexts but n_contexts = {p.n_contexts}; "
                         f"lower n_contexts or add contexts")
    return contexts[:p.n_contexts]


def check_model_path(model: str):
    """A `model` written as a local path must be a model folder; anything else is left to the
    loader (the embedded and tiny names, a hub id `org/name`, a folder that exists)."""
    if model in (EMBEDDED, TINY):
        return
    path = Path(model).expanduser()
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if not (looks_like_path or path.exists()):
        return  # a hub id
    if not path.is_dir():
        raise ParamError(f"model folder {model} does not exist (a local model is a folder with config.json; "
                         f"a hub id looks like org/name)")
    if not (path / "config.json").exists():
        raise ParamError(f"model folder {model} has no config.json: give the folder save_pretrained wrote")


def check_kept_from(folder: str, steer_method: str):
    """03_heal's `kept_from`: a 02_generate_filter run folder with its kept set and vector, extracted
    with the run's `steer_method` (params.yaml would otherwise name a method the data never saw)."""
    if not folder:
        return
    missing = [name for name in ("kept.jsonl", "vector_r0.pt") if not (Path(folder) / name).exists()]
    if missing:
        raise ParamError(f"kept_from {folder} is not a finished 02_generate_filter run folder "
                         f"(no {', '.join(missing)})")
    # vectors saved before methods existed carry no method: they are mean differences
    from shl.steer import Vector  # torch: only when there is a folder to read
    method = Vector.load(Path(folder) / "vector_r0.pt").meta.get("method", "mean_diff")
    if method != steer_method:
        raise ParamError(f"kept_from's vector was extracted with {method} but steer_method is {steer_method}: "
                         f"pass -p steer_method {method} or another kept_from")


def check_inputs(p: Params):
    """Every file and folder a run needs resolves, before any model loads."""
    load_demo(p)
    load_contexts(p)
    check_model_path(p.model)
    check_kept_from(p.kept_from, p.steer_method)
