"""The cluster's HA settings in the ``ha`` record: defaults, round trip, refused values."""

import pytest

from vmcluster.clusterstate.vmrecords import ha_settings_from_json, ha_settings_to_json
from vmcluster.core.ha import HaSettings


def test_missing_settings_are_the_defaults() -> None:
    assert ha_settings_from_json({}) == HaSettings()
    assert ha_settings_from_json({"armed": False}) == HaSettings()


def test_round_trip() -> None:
    settings = HaSettings(failover_on_isolation=False, restart_limit=3, restart_period_s=600.0,
                          failover_threshold=5, failover_period_s=7200.0)  # fmt: skip
    assert ha_settings_from_json(ha_settings_to_json(settings)) == settings


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("failover_on_isolation", "yes", "true or false"),
        ("restart_limit", -1, "0 to 1000"),
        ("restart_limit", True, "whole number"),
        ("failover_threshold", 1.5, "whole number"),
        ("restart_period_s", 10, "60 s to 30 days"),
        ("failover_period_s", "6h", "60 s to 30 days"),
    ],
)
def test_bad_values_name_the_setting(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=field) as caught:
        ha_settings_from_json({field: value})
    assert fragment in str(caught.value)


def test_the_threshold_may_be_the_default() -> None:
    assert ha_settings_from_json({"failover_threshold": None}).failover_threshold is None
