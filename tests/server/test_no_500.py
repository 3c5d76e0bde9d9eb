"""No request body, header or path makes the server answer 500 (property-based)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import auth

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
path_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(
        alphabet=st.characters(categories=["L", "N", "P", "S", "Zs"], blacklist_characters="/?#%"),
        min_size=1,
        max_size=12,
    ),
    st.just("a" * 64),
    st.just("0" * 64),
)


def _routes(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/api/v1")
        for method in operations
    ]


def test_random_requests_never_500(client: TestClient, tokens: dict[str, str]) -> None:
    routes = _routes(client)
    assert len(routes) > 15
    token_choices = [*tokens.values(), "", "pc_bogus", "\u00e9\u00e9"]

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        route=st.sampled_from(routes),
        params=st.lists(path_values, min_size=3, max_size=3),
        body=json_values,
        query=st.dictionaries(
            st.sampled_from(
                ["limit", "offset", "state", "subject_id", "format", "date_from", "valid"]
            ),
            st.text(max_size=10),
            max_size=3,
        ),
        token=st.sampled_from(token_choices),
    )
    def run(
        route: tuple[str, str], params: list[str], body: Any, query: dict[str, str], token: str
    ) -> None:
        method, path = route
        names = re.findall(r"{(\w+)}", path)
        for name, value in zip(names, params, strict=False):
            path = path.replace("{" + name + "}", quote(value, safe=""))
        headers = auth(token) if token.isascii() else {"Authorization": "Bearer x"}
        response = client.request(method, path, json=body, params=query, headers=headers)
        assert response.status_code < 500, (method, path, body, response.text)
        assert set(response.json()) >= {"type", "detail"} if response.status_code >= 400 else True

    run()
