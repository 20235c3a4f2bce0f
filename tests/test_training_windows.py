"""sampling=epochs (data.ShuffledEpochs): every token read once per epoch, the same windows however a
step's draw is split among ranks and micro-batches, and the same sequence after a resume."""
import numpy as np
import torch

from opengpt.data import ShuffledEpochs, TokenData


def draw(epochs, generator, sizes):
    return torch.cat([epochs.next_starts(generator, n) for n in sizes])


def test_an_epoch_reads_every_token_once_in_a_shuffled_order():
    n_tokens, block = 1000, 16
    epochs = ShuffledEpochs(n_tokens, block)
    starts = epochs.next_starts(torch.Generator().manual_seed(0), epochs.windows_per_epoch)
    reads = np.zeros(n_tokens, dtype=int)
    for start in starts.tolist():
        assert 0 <= start and start + block + 1 <= n_tokens  # a window and its shifted targets fit
        reads[start:start + block] += 1
    assert reads.max() == 1  # no token twice
    assert reads.sum() >= n_tokens - 2 * block  # at most a block's worth left at either end
    assert starts.tolist() != sorted(starts.tolist())


def test_epochs_run_into_each_other_the_same_however_the_draws_are_cut():
    epochs = ShuffledEpochs(1000, 16)
    n = epochs.windows_per_epoch  # 62
    whole = draw(epochs, torch.Generator().manual_seed(1), [150])
    cut = draw(ShuffledEpochs(1000, 16), torch.Generator().manual_seed(1), [7, 50, 1, 60, 32])
    assert torch.equal(whole, cut)
    first, second = whole[:n], whole[n:2 * n]
    assert len(set(second.tolist())) == n and not torch.equal(first, second)  # a whole epoch again, in another order


def test_a_saved_state_continues_the_same_sequence():
    generator, epochs = torch.Generator().manual_seed(2), ShuffledEpochs(1000, 16)
    draw(epochs, generator, [40, 40])  # into the second epoch
    saved_state, saved_generator = epochs.state_dict(), generator.get_state()
    expected = draw(epochs, generator, [100])
    resumed, resumed_generator = ShuffledEpochs(1000, 16), torch.Generator()
    resumed.load_state_dict(saved_state)
    resumed_generator.set_state(saved_generator)
    assert torch.equal(draw(resumed, resumed_generator, [100]), expected)


def test_two_ranks_read_the_windows_one_process_reads_with_twice_the_micro_batches(tiny_data):
    def batches(rank, world_size, count):
        data = TokenData(str(tiny_data), 16, "epochs")
        generator = torch.Generator().manual_seed(3)
        return [x for _ in range(30) for x in data.train_micro_batches(generator, 4, count, rank, world_size)[0]]
    single = batches(0, 1, 2)
    rank0, rank1 = batches(0, 2, 1), batches(1, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(single[0::2], rank0))
    assert all(torch.equal(a, b) for a, b in zip(single[1::2], rank1))
    assert not torch.equal(rank0[0], rank1[0])
