"""schemathesis against the admin API's own OpenAPI schema: generated requests to every
operation, with the admin's token and without one, find no 5xx, and every answer (errors
included) has a documented status, content type and body shape."""

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fleetwise.admin.app import Limits
from fleetwise.admin.auth import Role

from .admin_fleet import admin_fleet, headers

EXAMPLES = 20  # per operation: about a minute for all of them on a busy machine
admin, app = admin_fleet(Path(tempfile.mkdtemp(prefix="fleetwise-admin-schema-")),
                         Limits(rate_per_second=1e6, burst=1_000_000))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_as_admin(case):
    case.call_and_validate(headers=headers(Role.ADMIN), checks=CHECKS)


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_without_a_token(case):
    response = case.call_and_validate(headers={"Authorization": "Bearer wrong"}, checks=CHECKS)
    assert response.status_code == 401, "nothing but 401 before a valid token, whatever the request"
