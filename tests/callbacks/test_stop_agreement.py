"""StopAgreement: the ranks' agreement on a SIGTERM stop, in place of Lightning's per-batch broadcast (one process
here, over a one-member gloo group; tests/reliability/test_ddp.py runs it on two processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_llm.callbacks.signals import SigtermStop, StopAgreement


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fake_trainer(world_size: int = 2) -> SimpleNamespace:
    kills = []
    launcher = SimpleNamespace(kill=kills.append)
    return SimpleNamespace(world_size=world_size, global_rank=0, kills=kills,
                           strategy=SimpleNamespace(root_device=torch.device("cpu"), launcher=launcher),
                           _signal_connector=SimpleNamespace(received_sigterm=False))


def test_install_replaces_lightnings_broadcast_and_signal_notifier_once():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    agreement = StopAgreement.install(trainer)
    assert agreement is not None and StopAgreement.install(trainer) is agreement
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor == agreement.check_at_batch_start
    assert trainer._signal_connector._sigterm_notifier_fn == agreement.on_sigterm
    # A Lightning release without those pieces: nothing installed, Lightning's own checks stay.
    moved = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=object()), _signal_connector=object())
    assert StopAgreement.install(moved) is None


def test_a_sigterm_is_agreed_at_the_exchange_after_the_one_that_carried_it(group):
    trainer = fake_trainer()
    agreement = StopAgreement(trainer)
    assert agreement.exchange() is False  # batch 1: nothing read yet; launched "no SIGTERM"
    agreement.on_sigterm(15, None)  # arrives during batch 1
    assert agreement.held and not trainer._signal_connector.received_sigterm  # Lightning's loops do not see it
    assert agreement.exchange() is False  # batch 2 reads batch 1's "no"; launches "yes"
    assert agreement.resolve() is True  # read at the end of batch 2 (a step boundary)
    assert agreement.exchange() is True  # stays agreed

    agreement.deferred = True  # a Checkpoint saves first, then stops at the step boundary
    agreement.check_at_batch_start()
    agreement.deferred = False
    with pytest.raises(SIGTERMException):
        agreement.check_at_batch_start()
    assert trainer._signal_connector.received_sigterm  # every rank stops at this batch start


def test_the_signal_reaches_the_launched_ranks_once_and_one_process_keeps_lightnings_flag():
    trainer = fake_trainer(world_size=2)
    agreement = StopAgreement(trainer)
    agreement.on_sigterm(15, None)
    agreement.on_sigterm(15, None)
    assert trainer.kills == [15]

    single = fake_trainer(world_size=1)
    StopAgreement(single).on_sigterm(15, None)
    assert single._signal_connector.received_sigterm and single.kills == [15]


def test_sigterm_stop_holds_a_local_signal_until_the_ranks_agree(group):
    trainer = fake_trainer()
    trainer._lit_llm_stop_agreement = agreement = StopAgreement(trainer)
    stop = SigtermStop()
    agreement.exchange()
    trainer._signal_connector.received_sigterm = True  # set by some other handler, mid-batch
    assert stop.requested(trainer) is False  # not agreed yet: held back, so Lightning does not stop this rank alone
    assert agreement.held and not trainer._signal_connector.received_sigterm
    agreement.exchange()  # the next batch start carries it
    assert stop.requested(trainer) is True
    stop.stop(trainer)
    assert trainer._signal_connector.received_sigterm and not agreement.held


def test_sigterm_stop_holds_the_flag_itself_where_no_agreement_is_installed():
    trainer = fake_trainer(world_size=1)  # no _lit_llm_stop_agreement: a Lightning release without the pieces
    stop = SigtermStop()
    assert stop.requested(trainer) is False
    trainer._signal_connector.received_sigterm = True  # SIGTERM between two micro-batches
    stop.hold(trainer)
    assert not trainer._signal_connector.received_sigterm  # Lightning goes on to the end of the step
    assert stop.requested(trainer) is True
    stop.stop(trainer)
    assert trainer._signal_connector.received_sigterm and stop.requested(trainer) is True
    stop.hold(trainer)  # the stop's flag, held back once more, is still a request
    assert stop.requested(trainer) is True
