"""The original ClipCap decoders restated from the reference (batch 1, a full GPT-2 forward over the
whole sequence at every step, no KV cache): the oracle for tests/test_decoding.py and the baseline of
benchmarks/bench_caption.py, kept in one place so both measure against the same thing."""

from __future__ import annotations

import torch


def last_logits(model, generated: torch.Tensor) -> torch.Tensor:
    """Logits at the last position after a full forward (the original computed every position's)."""
    return model.gpt(inputs_embeds=generated).logits[:, -1]


@torch.no_grad()
def ref_beam(model, prefix, beam_size, entry_length, stop_id, temperature=1.0):
    """generate_beam: returns every beam as (tokens, score), best first."""
    device = prefix.device
    generated = prefix  # (1, K, E)
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, dtype=prefix.dtype, device=device)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool, device=device)
    for _ in range(entry_length):
        logits = last_logits(model, generated) / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            average = scores_sum / seq_lengths[:, None]
            average, flat = average.view(-1).topk(beam_size, -1)
            source = flat // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (flat % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
            is_stopped = is_stopped[source]
        embeds = model.gpt.get_input_embeddings()(next_tokens.squeeze(1)).view(beam_size, 1, -1)
        generated = torch.cat((generated, embeds), dim=1)
        is_stopped = is_stopped | next_tokens.eq(stop_id).squeeze(1)
        if is_stopped.all():
            break
    scores = scores / seq_lengths
    order = scores.argsort(descending=True)
    return [(tokens[j, : int(seq_lengths[j])].tolist(), float(scores[j])) for j in order]


@torch.no_grad()
def ref_greedy(model, prefix, entry_length, stop_id):
    """generate2: argmax, stop after the stop token (kept)."""
    generated, tokens = prefix, []
    for _ in range(entry_length):
        token = int(last_logits(model, generated).argmax(-1))
        tokens.append(token)
        generated = torch.cat(
            (generated, model.gpt.get_input_embeddings()(torch.tensor([[token]], device=prefix.device))), dim=1
        )
        if token == stop_id:
            break
    return tokens
