"""The README stays true to the code: two set-up commands on top, every setting and metric listed."""
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from services import metrics
from services.config import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_two_setup_commands_come_first():
    first_block = README.split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()[1:]] == ["make demo", "make test"]


def test_every_setting_is_documented():
    for name, field in Settings.model_fields.items():
        env = field.validation_alias.choices[0] if field.validation_alias else f"IAT_{name.upper()}"
        assert f"| `{env}` |" in README, f"{env} missing from README's configuration table"


def test_every_metric_is_documented():
    names = [m._name for m in vars(metrics).values() if isinstance(m, (Counter, Gauge, Histogram))]
    assert names
    for name in names:
        exported = f"{name}_total" if name in {m._name for m in vars(metrics).values() if isinstance(m, Counter)} else name
        assert f"`{exported}`" in README, f"{exported} missing from README's metrics table"
