"""Deep Context Distillation losses: teacher = the model with its LoRA disabled and the context, student = with it.

Both sides of a batch are LEFT padded, and every example's targets are the last `target_len` tokens of both its
teacher and its student sequence. So target tokens sit at the right edge of every row on both sides, the k-th target
token of an example is at the same row and the same distance from the end in both, and selecting them with the
boolean target masks (row-major order) lists the same tokens in the same order for teacher and student. Position
ids are given explicitly (0 at each row's first real token), so padding never shifts positions.

Reduction (as the reference code does it): every target token of the batch weighs the same. The KL term is the mean
over all target tokens of KL(teacher || student) summed over the full vocabulary; the hidden term is, per hidden-state
tensor, sum|h_s - h_t| / sum|h_t| over all target tokens and features (= mean|h_s - h_t| / mean|h_t|), averaged over
the tensors. A batch therefore equals the token-pooled combination of its examples, not the mean of per-example
losses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from trainer_worker.km_data import DcdExample

MSG_NO_TARGETS = "a batch needs at least one target token per example"
MSG_NO_CONTEXT = "next-token loss needs a real token before every target token (start sequences with BOS)"


@dataclass(frozen=True)
class SideBatch:
    """One side (teacher or student) of a batch: left-padded ids, masks and the rows' target positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor
    keep: int

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens on this side."""
        return int(self.attention_mask.sum().item())


@dataclass(frozen=True)
class DcdBatch:
    """A batch of examples as teacher inputs (context + target) and student inputs (target side only)."""

    teacher: SideBatch
    student: SideBatch

    @property
    def tokens(self) -> int:
        """Real tokens run through the model by one DCD step (both passes)."""
        return self.teacher.tokens + self.student.tokens


class DcdLoss(NamedTuple):
    """The training loss and its two terms (detached, for logging)."""

    total: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor


def collate_side(seqs: Sequence[Sequence[int]], target_lens: Sequence[int], pad_id: int,
                 device: torch.device | str = "cpu") -> SideBatch:
    """Left-pad sequences whose last `target_lens[i]` tokens are targets."""
    import torch

    if any(n < 1 or n > len(s) for s, n in zip(seqs, target_lens, strict=True)):
        raise ValueError(MSG_NO_TARGETS)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (seq, n) in enumerate(zip(seqs, target_lens, strict=True)):
        ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
        targets[row, width - n:] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return SideBatch(ids.to(device), mask.to(device), positions.to(device), targets.to(device), max(target_lens))


def collate(examples: Sequence[DcdExample], pad_id: int, device: torch.device | str = "cpu") -> DcdBatch:
    """The teacher and student sides of a batch of examples."""
    lens = [ex.target_len for ex in examples]
    teacher = collate_side([ex.teacher_ids for ex in examples], lens, pad_id, device)
    student = collate_side([ex.student_ids for ex in examples], lens, pad_id, device)
    return DcdBatch(teacher, student)


def forward_targets(model: Any, side: SideBatch, *, hidden: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [N, V] and hidden states ([N, H] per tensor) at the N target tokens of a side, row-major."""
    out = model(
        input_ids=side.input_ids, attention_mask=side.attention_mask, position_ids=side.position_ids,
        output_hidden_states=hidden, use_cache=False, logits_to_keep=side.keep,
    )
    # logits_to_keep: only the trailing `keep` positions (where every row's targets are) go through the LM head.
    logits = out.logits[side.target_mask[:, -side.keep:]]
    states = [h[side.target_mask] for h in out.hidden_states] if hidden else []
    return logits, states


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def teacher_targets(model: Any, side: SideBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The teacher's target logits and hidden states: the same model with its adapter disabled, no gradients."""
    import torch

    # Eval mode: the teacher is the base model as served, without any dropout of the base architecture.
    with _eval_mode(model), model.disable_adapter(), torch.no_grad():
        return forward_targets(model, side)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), summed over the full vocabulary, at a temperature."""
    import torch

    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    # where(): a token the teacher gives probability 0 (logit -inf) contributes 0, not 0 * inf = nan.
    per_token = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return per_token.mean()


def hidden_distance(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over hidden-state tensors of mean|h_s - h_t| / mean|h_t| over the target tokens."""
    import torch

    terms = [(s.float() - t.float()).abs().mean() / t.float().abs().mean()
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def dcd_loss(model: Any, batch: DcdBatch, *, temperature: float = 1.0, logit_factor: float = 1.0,
             hidden_factor: float = 1.0) -> DcdLoss:
    """logit_factor * KL(teacher || student) + hidden_factor * hidden-state distance, on target tokens only."""
    t_logits, t_states = teacher_targets(model, batch.teacher)
    s_logits, s_states = forward_targets(model, batch.student)
    kl = kl_divergence(t_logits, s_logits, temperature)
    hidden = hidden_distance(s_states, t_states)
    return DcdLoss(logit_factor * kl + hidden_factor * hidden, kl.detach(), hidden.detach())


def lm_loss(model: Any, side: SideBatch) -> torch.Tensor:
    """Next-token cross-entropy on a side's target tokens (each predicted from the position before it)."""
    import torch

    # One more trailing position: the logit before a row's first target predicts that target.
    if side.keep >= side.input_ids.shape[1] or not bool(side.attention_mask[:, -side.keep - 1:-1][
            side.target_mask[:, -side.keep:]].all()):
        raise ValueError(MSG_NO_CONTEXT)
    out = model(input_ids=side.input_ids, attention_mask=side.attention_mask, position_ids=side.position_ids,
                use_cache=False, logits_to_keep=side.keep + 1)
    logits = out.logits[:, :-1].float()
    labels = side.input_ids[:, -side.keep:]
    mask = side.target_mask[:, -side.keep:]
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask])
