"""build_forward_batch: decode batches a CUDA graph will replay stay on the host, everything else goes to the device.

The graph runner itself needs CUDA; here a CPU ModelRunner gets a stand-in that claims every decode batch, so the
host branch of the batch builder (what the graph runner is handed) is checked on any machine.
"""

from __future__ import annotations

import pytest
import torch

from sglang.bench_one_batch import make_runner
from sglang.srt.managers.schedule_batch import Req, build_forward_batch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs


class _ClaimsDecodeBatches:
    """Stands in for CudaGraphRunner.takes(): every decode batch without full logits would be replayed."""

    def takes(self, batch_size: int, return_full_logits: bool) -> bool:
        return not return_full_logits


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return make_runner(ServerArgs(model_path=tiny_model_dir("llama"), device="cpu", max_total_tokens=256))


def _decoding_reqs(runner) -> list[Req]:
    reqs = []
    for i, (prompt, outputs) in enumerate([([5, 6, 7], [11, 12]), ([20, 21], [30])]):
        req = Req(rid=str(i), origin_input_ids=prompt, sampling_params=SamplingParams(temperature=0.0))
        req.output_ids = outputs
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        req.kv_len = len(prompt) + len(outputs) - 1  # the newest output token is not in the cache yet
        reqs.append(req)
    return reqs


def test_graph_decode_batches_stay_on_the_host(runner, monkeypatch) -> None:
    reqs = _decoding_reqs(runner)
    table = runner.req_to_token_pool.req_to_token
    before = table.clone()
    monkeypatch.setattr(runner, "cuda_graph_runner", _ClaimsDecodeBatches())
    batch = build_forward_batch(reqs, ForwardMode.DECODE, torch.tensor([40, 41]), runner)
    rows = [r.req_pool_idx for r in reqs]
    # input_ids, positions, req_pool_indices, seq_lens, out_cache_loc: the order CudaGraphRunner stages.
    assert batch.host_inputs.tolist() == [[12, 30], [4, 2], rows, [5, 3], [40, 41]]
    assert batch.input_ids.data_ptr() == batch.host_inputs.data_ptr()  # the fields are views of it
    assert torch.equal(table, before)  # the graph records the new slots, not the builder
    # A host batch that reaches a runner without graphs is a bug, said as such rather than run on wrong inputs.
    monkeypatch.setattr(runner, "cuda_graph_runner", None)
    with pytest.raises(RuntimeError, match="built on the host"):
        runner.forward(batch)
    for req in reqs:
        runner.req_to_token_pool.free(req.req_pool_idx)


def test_other_batches_go_to_the_device_with_their_slots_recorded(runner, monkeypatch) -> None:
    reqs = _decoding_reqs(runner)
    monkeypatch.setattr(runner, "cuda_graph_runner", _ClaimsDecodeBatches())
    batch = build_forward_batch(reqs, ForwardMode.DECODE, torch.tensor([40, 41]), runner, return_full_logits=True)
    assert batch.host_inputs is None
    table = runner.req_to_token_pool.req_to_token
    assert [int(table[r.req_pool_idx, r.kv_len]) for r in reqs] == [40, 41]
    for req in reqs:
        runner.req_to_token_pool.free(req.req_pool_idx)
