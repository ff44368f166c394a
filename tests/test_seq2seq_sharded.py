"""The seq2seq net under DeepSpeed ZeRO 2/3 and tensor parallelism: the losses of one process
(the rest of the strategies are in test_seq2seq_task.py)."""

import pytest
from test_seq2seq_task import SHARED_OUTPUT

from lmlab.check_parallel import check

pytestmark = pytest.mark.slow


@pytest.mark.distributed
def test_two_processes_give_the_losses_of_one_under_deepspeed_and_tensor_parallel():
    """Two processes under ZeRO 2, ZeRO 3 and tensor parallelism follow one process's
    validation curve and decode its hypotheses, line for line (check_parallel raises
    otherwise)."""
    strategies = ["cpu", "deepspeed_zero2", "deepspeed_zero3", "tp"]
    curves = check(strategies, steps=4, overrides=SHARED_OUTPUT, lr=1.0)
    assert all(len(curves[s]) == 4 for s in strategies)
