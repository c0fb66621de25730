"""The default task: a byte-level GPT language model on a text corpus (Python's stdlib by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.lm.data import TokenWindows, prepare
from train.lm.model import GPT
from train.task import Batch, Task

SAMPLE_PROMPT = b"def "


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def build(cfg: Config) -> Task:
    train_bin, val_bin = prepare(cfg.data.path, cfg.data.cache_dir, cfg.data.val_every)
    model = GPT(cfg.model, cfg.data.seq_len)

    def sample(m: nn.Module) -> str:
        gen = torch.Generator().manual_seed(cfg.seed)
        text = SAMPLE_PROMPT + m.generate(SAMPLE_PROMPT, cfg.sample_bytes, gen)
        return text.decode("utf-8", errors="replace")

    return Task(
        model=model,
        train_data=TokenWindows(train_bin, cfg.data.seq_len),
        val_data=TokenWindows(val_bin, cfg.data.seq_len),
        loss_fn=lm_loss,
        sample_fn=sample if cfg.sample_bytes > 0 else None,
    )
