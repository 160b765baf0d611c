import io
import json
import math

import numpy as np
import pytest

from spdjax.training.schedules import make_schedule
from spdjax.training.progress import format_duration
from spdjax.training.workdir import JsonlWriter


def test_paper_cosine_is_quarter_period():
    s = make_schedule("cosine", 1e-3, 101)
    np.testing.assert_allclose(s(0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(s(50), 1e-3 * math.cos(math.pi / 4), rtol=1e-5)
    np.testing.assert_allclose(s(100), 0.0, atol=1e-10)  # 0 at the last update step


def test_half_cosine_linear_constant_and_warmup():
    half = make_schedule("cosine_half", 1.0, 11, final_frac=0.1)
    np.testing.assert_allclose([half(0), half(5), half(10)], [1.0, 0.55, 0.1], rtol=1e-5)
    lin = make_schedule("linear", 2.0, 5)  # paper-era: 1 - t/T, so lr/T at the last update
    np.testing.assert_allclose([lin(i) for i in range(5)], [2.0, 1.6, 1.2, 0.8, 0.4], atol=1e-6)
    head = make_schedule("linear_head", 2.0, 5)  # later reference: t over T - 1 steps
    np.testing.assert_allclose([head(i) for i in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0], atol=1e-6)
    head_f = make_schedule("linear_head", 1.0, 11, final_frac=0.2, warmup_frac=0.5)
    np.testing.assert_allclose([head_f(0), head_f(4), head_f(5), head_f(10)], [0, 0.8, 1, 0.2],
                               atol=1e-6)
    const = make_schedule("constant", 3e-3, 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(3e-3)
    warm = make_schedule("constant", 1.0, 100, warmup_frac=0.1)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(50)], [0.0, 0.5, 1.0, 1.0])
    vals = [float(make_schedule("cosine", 1.0, 50)(i)) for i in range(50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(name="cos"), "Unknown lr schedule 'cos'"),
    (dict(name="cosine", warmup_frac=1.0), "warmup_frac"),
    (dict(name="cosine", lr=0.0), "lr must be positive"),
])
def test_schedule_errors(kwargs, msg):
    args = dict(name="cosine", lr=1e-3, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=msg):
        make_schedule(args.pop("name"), args.pop("lr"), args.pop("total_steps"), **args)


def test_jsonl_writer_truncates_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    w = JsonlWriter(path)
    for s in (10, 20, 30):
        w.write_scalars(s, {"loss": s / 10})
    w.close()
    w = JsonlWriter(path, resume_step=20)
    w.write_scalars(30, {"loss": 9.0})
    w.close()
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [l["step"] for l in lines] == [10, 20, 30] and lines[-1]["loss"] == 9.0
    assert format_duration(3725) == "1h02m05s" and format_duration(65) == "1m05s"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_is_a_live_bar_on_a_terminal_and_plain_lines_elsewhere(terminal):
    import logging

    from spdjax.training.progress import Progress, log_to

    stream = _Terminal() if terminal else io.StringIO()
    with log_to(stream):
        progress = Progress(100, 0)
        for step in (50, 100):
            progress.mark(step)
            progress.report(step, 0.5)
            if step == 50:
                logging.getLogger("spdjax").warning("something to say")
    text = stream.getvalue()
    assert "step  50/100 | loss 5.0000e-01" in text and "WARNING: something to say" in text
    if terminal:  # redrawn in place with a bar, the warning printed above it
        assert "\r\033[K[############............] step  50/100" in text
        assert "[########################] step 100/100" in text and text.endswith("\n")
        assert text.count("\n") == 2  # the warning's line and the finished bar's
    else:
        assert "\r" not in text and "[#" not in text and len(text.splitlines()) == 3


def test_a_loss_option_spelled_at_its_default_is_no_config_change(tmp_path):
    """A run recorded before its config file named an option (``sampling="continuous"`` in the
    +head terms) resumes; setting the option to something else is still refused."""
    from spdjax.config import files as configs
    from spdjax.losses.total import is_default_option
    from spdjax.training.workdir import ConfigMismatchError, prepare

    assert is_default_option("stochastic_recon", "sampling", "continuous")
    assert not is_default_option("stochastic_recon", "sampling", "binomial")
    assert is_default_option("stochastic_recon", "n_samples", 1)
    assert not is_default_option("stochastic_recon", "n_samples", True)
    assert not is_default_option("no_such_term", "sampling", "continuous")
    new = configs.to_dict(configs.load("tms:5-2+head"))
    old = json.loads(json.dumps(new))
    del old["losses"]["stochastic_recon"]["sampling"]
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert prepare(tmp_path, new, fresh=False) == []
    (tmp_path / "config.json").write_text(json.dumps(old))
    binomial = json.loads(json.dumps(new))
    binomial["losses"]["stochastic_recon"]["sampling"] = "binomial"
    with pytest.raises(ConfigMismatchError, match="losses.stochastic_recon.sampling"):
        prepare(tmp_path, binomial, fresh=False)
