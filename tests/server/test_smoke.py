from fastapi.testclient import TestClient

from tests.conftest import auth


def test_health_without_token(client: TestClient) -> None:
    r = client.get("/api/v1/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["database"]["ok"] is True and body["blob_store"]["ok"] is True


def test_subjects_need_token(client: TestClient, tokens: dict[str, str]) -> None:
    assert client.get("/api/v1/subjects").status_code == 401
    r = client.post("/api/v1/subjects", json={"name": "monkey-m"}, headers=auth(tokens["operator"]))
    assert r.status_code == 201, r.text
    r = client.post("/api/v1/subjects", json={"name": "monkey-x"}, headers=auth(tokens["viewer"]))
    assert r.status_code == 403 and r.json()["type"] == "forbidden"
