"""The scaling report: the same load per GPU at each size, the events counted, its command."""

from typer.testing import CliRunner

from fleetwise.cli import app
from fleetwise.sim.run import PoolConfig, SimConfig
from fleetwise.sim.scaling import scaled, scaling


def test_each_size_gets_the_same_load_per_gpu():
    base = SimConfig([PoolConfig("prefill", 2), PoolConfig("decode", 3)], poisson_rate=5.0, duration_s=20)
    four = scaled(base, 4)
    assert [p.count for p in four.pools] == [8, 12] and four.poisson_rate == 20.0
    assert scaled(SimConfig(base.pools, rate_scale=2.0), 4).rate_scale == 8.0
    seen: dict[int, float] = {}
    points = scaling(base, [20, 80], lambda gpus, t, horizon: seen.__setitem__(gpus, t))
    assert [p.gpus for p in points] == [20, 80]
    assert 3.5 < points[1].requests / points[0].requests < 4.5
    assert all(p.events > 2 * p.requests and p.events_per_s > 0 and p.cpu_s > 0 for p in points)


def test_fleetwise_sim_scale_prints_a_row_per_size_and_draws_it(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("pools: [{role: prefill, count: 1}, {role: decode, count: 1}]\nrate_scale: 1\n")
    result = CliRunner().invoke(app, ["sim", "scale", str(config), "--sizes", "8,16", "--duration", "20",
                                      "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "16" in result.output and (tmp_path / "s.png").exists() and (tmp_path / "s.json").exists()
    bad = CliRunner().invoke(app, ["sim", "scale", "--sizes", "1k"])
    assert bad.exit_code == 2 and "--sizes" in bad.output


def test_every_example_configuration_builds():
    import yaml

    from fleetwise.sim.run import build, config_from_dict
    from fleetwise.sim.scaling import EXAMPLE

    examples = sorted(EXAMPLE.parent.glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        sim = build(config_from_dict(yaml.safe_load(path.read_text())))
        assert sim.workers, path.name
