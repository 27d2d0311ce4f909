"""The main job with --world-size-invariant: the same final digest at 1, 2, 3 and 4 ranks
and without mpirun; stopped at 2 ranks, it resumes at 3 or at 1 onto the same digest."""

import pytest

from tests.e2e.test_training import final_line, single

pytestmark = pytest.mark.slow

TRAIN = ("--epochs", "4", "--quiet", "--world-size-invariant", "--seed", "2")


def test_every_world_size_and_one_process_print_the_same_digest(mpirun):
    alone = final_line(single(*TRAIN))
    for ranks in (1, 2, 3, 4):
        assert final_line(mpirun(ranks, "-m", "distsgd.train", *TRAIN))[1:] == \
            (alone[1], ranks, alone[3])
    assert final_line(mpirun(2, "-m", "distsgd.train", *TRAIN[:3], "--seed", "2"))[3] != \
        alone[3]  # without the mode, the digest depends on the world size


@pytest.mark.parametrize("resume_at", [3, 1])
def test_stop_at_two_ranks_resume_at_another_size_onto_the_same_digest(mpirun, tmp_path,
                                                                        resume_at):
    uninterrupted = final_line(single(*TRAIN))
    directory = tmp_path / "ckpt"
    stopped = final_line(mpirun(2, "-m", "distsgd.train", *TRAIN, "--max-steps", "37",
                                "--checkpoint-dir", directory))
    assert stopped[1] == 37
    result = mpirun(resume_at, "-m", "distsgd.train", *TRAIN, "--checkpoint-dir", directory,
                    "--resume")
    resumed = final_line(result)
    assert (resumed[1], resumed[3]) == (uninterrupted[1], uninterrupted[3])
    assert f"written by 2 ranks at {resume_at}" in result.stderr
