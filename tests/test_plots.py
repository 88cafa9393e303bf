"""plots.py's drawings that the notebooks show: the adapted layer's diagram names the terms it draws."""

import matplotlib.pyplot as plt
import pytest

import plots


@pytest.mark.parametrize("gate, allocation, term", [(True, True, r"m \odot g(x)"), (True, False, "g(x)"),
                                                   (False, True, "m"), (False, False, None)])
def test_the_adapter_diagram_draws_the_formula_of_its_switches(gate, allocation, term, tmp_path):
    fig = plots.adapter_diagram(gate=gate, allocation=allocation, path=tmp_path / "d.png")
    title = fig.axes[0].get_title()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    assert (tmp_path / "d.png").stat().st_size > 0
    if term is None:
        assert "diag" not in title and "B A x" in title.replace("BA", "B A"), title
    else:
        assert rf"\mathrm{{diag}}({term})" in title, title
    assert ("W_g" in texts) == gate and ("allocator" in texts) == allocation, texts
