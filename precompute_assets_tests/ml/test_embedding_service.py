"""The HTTP inference-service embedder against a local fake service on 127.0.0.1 that injects faults."""

from __future__ import annotations

import email.utils
import time

import numpy as np
import pytest

from precompute_assets.ml import embedding_service as es
from precompute_assets.ml.embedder import embed_documents
from precompute_assets.ml.embedding_service import EmbeddingServiceError, HttpEmbedder
from precompute_assets_tests.sync.fake_embedding_service import FakeEmbeddingService, vector_of

DIM = 16


@pytest.fixture
def service():
    with FakeEmbeddingService(dim=DIM, hang_s=1.0) as running:
        yield running


class Sleeps(list):
    """Records the waits asked for instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def embedder(service: FakeEmbeddingService, **options) -> HttpEmbedder:
    defaults = {"url": service.url, "model": "fake", "dim": DIM, "batch_size": 4, "max_concurrency": 2,
                "timeout_s": 0.3, "max_retries": 3, "backoff_s": 0.01, "sleep": Sleeps()}  # fmt: skip
    return HttpEmbedder(**{**defaults, **options})


def unit(text: str) -> np.ndarray:
    v = vector_of(text, DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


TEXTS = [f"text number {i}" for i in range(10)]


@pytest.mark.parametrize("api", ["openai", "tei"])
def test_vectors_in_input_order_in_batches_with_bounded_concurrency(service, api):
    service.shuffle = True  # OpenAI items out of order: placed by their index
    service.delay_s = 0.05
    model = embedder(service, api=api, batch_size=3, max_concurrency=2)
    vectors = model.encode(TEXTS)
    assert vectors.shape == (10, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.stack([unit(t) for t in TEXTS]), atol=1e-6)
    assert service.requests == 4  # ceil(10 / 3)
    assert 1 <= service.max_in_flight <= 2


def test_the_dimension_is_probed_when_not_given(service):
    model = embedder(service, dim=0)
    assert model.dim == DIM and service.requests == 1


@pytest.mark.parametrize("fault", ["timeout", "reset", "429", "500", "503", "garbage"])
def test_transient_faults_are_retried_with_backoff(service, fault):
    service.plan = lambda texts, number: fault if number < 2 else None  # the first two attempts fail
    model = embedder(service, batch_size=10, max_retries=3)
    vectors, failures = model.encode_checked(TEXTS)
    assert failures == {} and service.requests == 3
    np.testing.assert_allclose(vectors[0], unit(TEXTS[0]), atol=1e-6)
    sleeps = model.sleep
    assert len(sleeps) == 2
    if fault == "429":
        assert all(s >= 1.0 for s in sleeps)  # Retry-After: 1 is a floor
    else:
        assert sleeps[0] <= 0.01 and sleeps[1] <= 0.02  # full jitter under the doubling cap


def test_retry_after_as_a_date_is_honoured_and_capped(service):
    service.retry_after = email.utils.formatdate(time.time() + 3600, usegmt=True)
    service.plan = lambda texts, number: "429" if number == 0 else None
    model = embedder(service, batch_size=10, max_retry_after_s=5.0)
    model.encode(TEXTS)
    assert model.sleep == [5.0]
    assert es._retry_after("2.5") == 2.5 and es._retry_after("soon") is None and es._retry_after(None) is None


@pytest.mark.parametrize(
    ("fault", "reason", "requests"),
    [
        ("timeout", es.TIMEOUT, 3),
        ("reset", es.CONNECTION, 3),
        ("429", "service: http 429", 3),
        ("500", "service: http 500", 3),
        ("503", "service: http 503", 3),
        ("garbage", es.BAD_RESPONSE, 3),
        ("400", "service: http 400", 1),  # a client error is not retried
    ],
)
def test_a_batch_that_keeps_failing_is_a_counted_failure_of_each_of_its_texts(service, fault, reason, requests):
    service.retry_after = "0"
    service.plan = lambda texts, number: fault if "text number 5" in texts else None
    model = embedder(service, batch_size=4, max_retries=2)
    vectors, failures = model.encode_checked(TEXTS)
    assert failures == {4: reason, 5: reason, 6: reason, 7: reason}  # the batch of texts 4..7
    assert service.attempts["text number 5"] == requests
    assert not vectors[4:8].any()
    np.testing.assert_allclose(vectors[8], unit(TEXTS[8]), atol=1e-6)
    with pytest.raises(EmbeddingServiceError, match="4 texts were not embedded"):
        model.encode(TEXTS)


@pytest.mark.parametrize("api", ["openai", "tei"])
def test_wrong_dimension_nan_and_missing_items_fail_alone_and_are_not_retried(service, api):
    faults = {"text number 1": "dim", "text number 2": "nan"}
    service.item_plan = faults.get
    model = embedder(service, api=api, batch_size=10)
    vectors, failures = model.encode_checked(TEXTS)
    assert failures == {1: es.WRONG_DIMENSION, 2: es.NON_FINITE} and service.requests == 1
    good = [i for i in range(10) if i not in failures]
    np.testing.assert_allclose(vectors[good], np.stack([unit(TEXTS[i]) for i in good]), atol=1e-6)

    faults["text number 4"] = "missing"
    _, failures = model.encode_checked(TEXTS)
    if api == "openai":  # items carry their index: only the missing one fails
        assert failures == {1: es.WRONG_DIMENSION, 2: es.NON_FINITE, 4: es.MISSING_ITEM}
    else:  # a bare list one short: no vector can be matched to its text, so none is used
        assert failures == dict.fromkeys(range(10), es.MISSING_ITEM)
    assert service.requests == 2


def test_service_failures_become_document_failures(service):
    service.item_plan = lambda text: "nan" if text.endswith("3") else None
    model = embedder(service)
    result = embed_documents(model, [("doc", str(i)) for i in range(6)] + [("", "")])
    assert result.failures == {3: es.NON_FINITE, 6: "empty"}
    assert result.indices == [0, 1, 2, 4, 5] and result.vectors.shape == (5, DIM)
    np.testing.assert_allclose(result.vectors[3], unit("doc\n4"), atol=1e-6)


def test_the_api_key_comes_from_the_environment_and_is_never_shown(service, monkeypatch):
    monkeypatch.setenv("MY_EMBEDDING_KEY", "sk-secret-123")
    service.plan = lambda texts, number: "400"
    model = embedder(service, api_key_env="MY_EMBEDDING_KEY")
    _, failures = model.encode_checked(TEXTS[:2])
    assert service.authorization[-1] == "Bearer sk-secret-123"
    shown = repr(model) + model.version + str(failures) + str(EmbeddingServiceError(failures))
    assert "sk-secret" not in shown
    monkeypatch.delenv("MY_EMBEDDING_KEY")
    assert embedder(service, api_key_env="MY_EMBEDDING_KEY")._api_key is None


def test_user_info_in_the_url_is_basic_authentication_and_never_shown(service):
    """``http://user:password@host`` was never sent (the service refused every batch), and its repr showed the
    password (h_secrets)."""
    import base64

    url = service.url.replace("://", "://svc:Top%40Secret9@", 1)
    model = embedder(service, url=url)
    model.encode_checked(TEXTS[:2])
    assert service.authorization[-1] == "Basic " + base64.b64encode(b"svc:Top@Secret9").decode()
    assert (
        "Secret9" not in repr(model) + model.version
        and "svc" not in repr(model)
        and "url='http://127.0.0.1:" in repr(model)
    )


def test_version_follows_url_model_and_dimension(service, monkeypatch):
    base = embedder(service).version
    assert base == embedder(service, batch_size=7, max_retries=0).version  # tuning is not identity
    assert base.startswith(f"http:fake:{DIM}:")
    assert embedder(service, model="other").version != base
    assert embedder(service, dim=DIM + 1).version != base
    assert embedder(service, url=service.url + "/v1/embeddings/").version == base  # the same endpoint
    assert embedder(service, api="tei").version != base
    monkeypatch.setenv(es.ENV_URL, service.url)
    assert embedder(service, url="").version == base
    user = service.url.replace("http://", "http://user:pw@")
    assert embedder(service, url=user).version == base  # credentials in the URL are not identity


def test_bad_configuration_is_refused(monkeypatch):
    monkeypatch.delenv(es.ENV_URL, raising=False)
    with pytest.raises(ValueError, match="needs a URL"):
        HttpEmbedder(dim=4)
    with pytest.raises(ValueError, match="api must be"):
        HttpEmbedder(url="http://127.0.0.1:1", dim=4, api="grpc")
    with pytest.raises(ValueError, match="not an http"):
        HttpEmbedder(url="ftp://127.0.0.1:1", dim=4)


@pytest.mark.parametrize("url", ["https://user:s3c/ret@embed.example", "ftp://user:s3c/ret@embed.example"])
def test_a_url_whose_port_cannot_be_read_is_refused_without_the_password(url):
    """A '/' in the URL's password ended its authority: urllib's "Port could not be cast to integer value as 's3c'"
    failed the embedding step with the password's start."""
    with pytest.raises(ValueError) as refused:
        HttpEmbedder(url=url, dim=4)
    assert "s3c" not in str(refused.value) and "ret" not in str(refused.value), refused.value


@pytest.mark.parametrize(
    "url",
    [
        "http://:s3c?ret@embed.example/embed",  # a token as the password, no user name
        "http://:s3c#ret@embed.example/embed",
        "htps://user:s3c?ret@embed.example/embed",  # a mistyped scheme
        "http:/user:s3cret@embed.example/embed",  # a mistyped '://'
    ],
)
def test_a_url_that_is_no_http_url_is_refused_without_the_password(url):
    """The "not an http(s) URL" error showed a password whose unencoded '?' or '#' ended the authority inside it (or a
    URL whose '://' was mistyped) whole: only the user info before the first '?' or '#' was taken out."""
    with pytest.raises(ValueError, match="not an http") as refused:
        HttpEmbedder(url=url, dim=4)
    assert "s3c" not in str(refused.value) and "ret" not in str(refused.value), refused.value
    assert "embed.example/embed" in str(refused.value), refused.value


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        # Without an '@' before the '?', the user info was read to the URL's last '@': a service at ...?user=me@corp
        # that failed was named 'http://corp' (and one whose query held a key with an '@', by the key's tail).
        ("user=me@corp", "user=***"),
        # A service that takes its key in the query (an Azure Function's ?code=, Google's ?key=) keeps it there, and
        # every failure said 'embedding service at http://host/v1/embeddings?code=<the key>' in the step's error.
        ("code=s3cretKEY&region=eu", "code=***&region=***"),
    ],
)
def test_a_query_is_named_without_its_values_and_never_as_the_host(service, query, shown):
    service.plan = lambda texts, number: "400"
    with pytest.raises(RuntimeError, match="embedding service at") as failed:
        embedder(service, url=f"{service.url}/v1/embeddings?{query}", dim=0, max_retries=0)
    assert f"embedding service at {service.url}/v1/embeddings?{shown}:" in str(failed.value), failed.value


def test_a_password_with_an_at_sign_before_its_question_mark_is_never_shown():
    """The user info was read to the last '@' before the first '?': 'htps://user:s3c@r?etTAIL@embed.example/embed'
    was refused as 'htps://r?etTAIL@embed.example/embed', the password's rest."""
    with pytest.raises(ValueError, match="not an http") as refused:
        HttpEmbedder(url="htps://user:s3c@r?etTAIL@embed.example/embed", dim=4)
    assert "etTAIL" not in str(refused.value) and "embed.example/embed" in str(refused.value), refused.value


def test_a_password_whose_start_reads_as_a_port_is_refused():
    """urllib ends the authority at a password's '?': 'https://user:2024?ret@embed.example' was taken for host 'user',
    port 2024, and every batch failed as a connection error of a service that was never asked."""
    with pytest.raises(ValueError, match="cannot be read") as refused:
        HttpEmbedder(url="https://user:2024?ret@embed.example", dim=4)
    assert "2024" not in str(refused.value), refused.value


def test_a_password_whose_at_sign_comes_before_a_slash_is_refused():
    """urllib reads the user info to the last '@' before the first '/': 'https://k:Se@cr/etPW@embed.example/v1' was
    taken for host 'cr', a part of the password, which every batch's connection error then named."""
    with pytest.raises(ValueError, match="cannot be read") as refused:
        HttpEmbedder(url="https://k:Se@cr/etPW@embed.example/v1", dim=4)
    assert "etPW" not in str(refused.value), refused.value
