"""Contrastive pretraining of ``toy-clip`` on the procedural toy world (``promptclip toyworld pretrain``).

A real CLIP objective (symmetric InfoNCE with a learned temperature) on generated image-caption pairs, with 16
colour-shape combinations held out so that zero-shot accuracy on them measures compositional generalisation.

Details that keep it fast and reproducible on 2 CPU cores:
* deterministic: model init, every batch (seeded by step) and the optimiser are seeded; same thread count and
  torch version give the same weights;
* the text tower runs on the shortest prefix that holds every caption's EOT token: with a causal mask the EOT
  features are exactly those of the full 77-token context, at a fraction of the cost;
* the token embedding starts at zero except for the rows of the world's vocabulary, and embeddings get no weight
  decay, so untouched rows stay zero and the weights file stores only the trained rows (a few MB).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from serving.manifest import sha256_file
from training.backbone import (
    OPENAI_MEAN,
    OPENAI_STD,
    TOY_CLIP_WEIGHTS,
    get_backbone_spec,
    load_weights_file,
    save_compact_weights,
    state_fingerprint,
)
from training.toyworld import world

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / TOY_CLIP_WEIGHTS
EVAL_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    holdout_seed: int = 0
    eval_every: int = 500
    eval_per_class: int = 4
    threads: int = 2


def world_vocabulary(tokenizer) -> list[int]:
    """Every token id a world caption or a downstream prompt can contain (plus SOT/EOT and CoOp's "X")."""
    words: set[str] = set()
    for template in world.CAPTION_TEMPLATES:
        for size in world.SIZES:
            for texture in world.TEXTURES:
                words.add(template.format(size=size, color="red", shape="circle", texture=texture))
    words |= set(world.COLORS) | set(world.SHAPES) | {"next to a", EVAL_TEMPLATE.format(""), "X"}
    words |= {f"{c} {s}" for c in world.COLORS for s in world.SHAPES}
    ids = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    for w in words:
        ids.update(tokenizer.encode(w))
    return sorted(ids)


def build_model(seed: int, vocab_ids: list[int]):
    """open_clip CLIP with the toy-clip config, seeded; token rows outside ``vocab_ids`` zeroed."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**get_backbone_spec("toy-clip").model_cfg)
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[torch.tensor(vocab_ids)] = True
        model.token_embedding.weight[~keep] = 0.0
    return model


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] (CLIP mean/std, as serving's preprocessing)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_prefix(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text on the shortest prefix holding every EOT (identical EOT features under the causal
    mask)."""
    length = int(ids.argmax(dim=-1).max()) + 1
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]  # [N, L, W]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # [N, W]
    return x @ model.text_projection  # [N, D]


@torch.no_grad()
def zero_shot_eval(model, tokenizer, *, style: str, classes: list[tuple[str, str]], per_class: int, seed: int,
                   candidates: list[tuple[str, str]] | None = None) -> float:
    """Top-1 zero-shot accuracy on ``per_class`` rendered images of each class in ``classes`` (candidates: all 120)."""
    candidates = candidates or world.all_classes()
    names = [world.class_name(c, s) for c, s in candidates]
    text = F.normalize(encode_text_prefix(model, tokenizer([EVAL_TEMPLATE.format(n) for n in names])), dim=-1)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for color, shape in classes:
        for _ in range(per_class):
            scene = world.sample_scene(rng, color, shape, style=style)
            images.append(np.asarray(world.render(scene, style=style, size=32, rng=rng)))
            labels.append(candidates.index((color, shape)))
    feats = F.normalize(model.encode_image(to_tensor(np.stack(images))), dim=-1)
    pred = (feats @ text.t()).argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


def pretrain(cfg: PretrainConfig, out_path: str | Path = DEFAULT_WEIGHTS_PATH, *,
             progress: bool = True) -> dict[str, Any]:
    """Pretrain toy-clip and write ``out_path`` (compact safetensors) plus ``out_path.with_suffix('.json')``."""
    from open_clip.tokenizer import SimpleTokenizer
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    tokenizer = SimpleTokenizer()
    vocab = world_vocabulary(tokenizer)
    vocab_set = set(vocab)
    model = build_model(cfg.seed, vocab)
    model.train()
    holdout = world.default_holdout(cfg.holdout_seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "ln" in name or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seen = [c for c in world.all_classes() if c not in set(holdout)]
    bar = tqdm(range(cfg.steps), desc="pretrain toy-clip", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else \
            0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        images, captions, _ = world.pretrain_batch(cfg.seed * 1_000_003 + step, cfg.batch_size, holdout=holdout)
        ids = tokenizer(captions)
        if step == 0 and not set(ids.unique().tolist()) <= vocab_set | {0}:
            raise RuntimeError("a caption uses tokens outside world_vocabulary(); update it")
        img = F.normalize(model.encode_image(to_tensor(images)), dim=-1)  # [B, D]
        txt = F.normalize(encode_text_prefix(model, ids), dim=-1)  # [B, D]
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()  # [B, B]
        # captions can repeat within a batch: treat identical captions as positives of each other
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(-1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), -1), -1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            row = {"step": step + 1, "loss": loss.item(),
                   "zs_seen": zero_shot_eval(model, tokenizer, style="clean", classes=seen[::4],
                                             per_class=cfg.eval_per_class, seed=1),
                   "zs_heldout": zero_shot_eval(model, tokenizer, style="clean", classes=holdout,
                                                per_class=cfg.eval_per_class, seed=1)}
            history.append(row)
            log.info("step %d: loss %.3f, zero-shot clean seen %.1f%%, held-out %.1f%%", row["step"], row["loss"],
                     100 * row["zs_seen"], 100 * row["zs_heldout"])
            model.train()
    seconds = time.perf_counter() - t0
    model.eval()
    metrics = {s: zero_shot_eval(model, tokenizer, style=s, classes=world.all_classes(), per_class=2, seed=2)
               for s in world.STYLES}
    out_path = Path(out_path)
    save_compact_weights(model, out_path, metadata={"format": "promptclip.compact", "backbone": "toy-clip"})
    check = build_model(cfg.seed + 1, vocab)
    load_weights_file(check, str(out_path))
    info = {"backbone": "toy-clip", "config": asdict(cfg), "seconds": round(seconds, 1),
            "file": out_path.name, "sha256": sha256_file(out_path), "weights_fingerprint": state_fingerprint(check),
            "holdout": [world.class_name(c, s) for c, s in holdout], "history": history,
            "zero_shot_all120_by_style": metrics, "torch": torch.__version__}
    out_path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("toy-clip written to %s in %.0fs; zero-shot (120 classes) by style: %s", out_path, seconds,
             {k: round(100 * v, 1) for k, v in metrics.items()})
    return info
