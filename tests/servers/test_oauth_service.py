import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from heist_common.config import FailedSecretsConfig
from servers.auth import credential_store
from servers.oauth.service import FailedSecrets, peer_host
from tests.support import channels


@pytest.fixture
async def oauth(mesh):
    return oauth_pb2_grpc.OAuthServiceStub(await mesh.channel("oauth"))


def grant(config, client_id="safecracker", scopes=(), secret=None, grant_type="client_credentials"):
    if secret is None:
        secret = credential_store.client_secret(config, client_id)
    return oauth_pb2.IssueTokenRequest(
        grant_type=grant_type, client_id=client_id, client_secret=secret, scopes=list(scopes)
    )


async def test_issued_token_has_the_documented_claims(config, oauth):
    response = await oauth.IssueToken(grant(config, scopes=["calculator:use"]))
    assert response.token_type == "Bearer"
    assert response.expires_in == 900
    assert list(response.scopes) == ["calculator:use"]
    header = jwt.get_unverified_header(response.access_token)
    assert header["alg"] == "EdDSA" and header["kid"]
    claims = jwt.decode(
        response.access_token, credential_store.public_key(config), algorithms=["EdDSA"], audience="heist-mesh"
    )
    assert claims["iss"] == "heist-oauth" and claims["sub"] == "safecracker" and claims["scope"] == "calculator:use"
    assert claims["exp"] - claims["iat"] == 900 and claims["jti"]


async def test_empty_scopes_grant_every_allowed_scope(config, oauth):
    response = await oauth.IssueToken(grant(config, client_id="crew"))
    assert sorted(response.scopes) == ["calculator:use", "database_query:use", "file_reader:use"]


async def test_issued_token_works_on_a_tool_server(config, mesh, oauth):
    token = (await oauth.IssueToken(grant(config, scopes=["calculator:use"]))).access_token
    calculator = calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))
    response = await calculator.Evaluate(
        calculator_pb2.EvaluateRequest(expression="6 * 7"), metadata=[("authorization", f"Bearer {token}")]
    )
    assert response.rendered == "6 * 7 = 42"


@pytest.mark.parametrize(
    ("overrides", "code", "fragment"),
    [
        ({"grant_type": "password"}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported grant_type 'password'"),
        ({"grant_type": ""}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported grant_type ''"),
        ({"client_id": "", "secret": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "client_id"),
        ({"client_id": "stranger", "secret": "x"}, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials"),
        ({"secret": "wrong"}, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials"),
        ({"secret": ""}, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials"),
        ({"scopes": ["database_query:use"]}, grpc.StatusCode.PERMISSION_DENIED, "database_query:use"),
        ({"scopes": ["calculator:use", "admin"]}, grpc.StatusCode.PERMISSION_DENIED, "admin"),
    ],
)
async def test_bad_grants_are_refused(config, oauth, fails_with, overrides, code, fragment):
    await fails_with(oauth.IssueToken(grant(config, **overrides)), code, fragment)


def introspect(config, token, client_id="admin"):
    secret = credential_store.client_secret(config, client_id)
    return oauth_pb2.IntrospectTokenRequest(token=token, client_id=client_id, client_secret=secret)


async def test_introspection_reports_active_tokens(config, mesh, oauth):
    token = (await oauth.IssueToken(grant(config))).access_token
    info = await oauth.IntrospectToken(introspect(config, token))
    assert info.active and info.client_id == "safecracker" and list(info.scopes) == ["calculator:use"]
    assert info.issuer == "heist-oauth" and info.audience == "heist-mesh" and info.token_type == "Bearer"
    assert info.expires_at - info.issued_at == 900


@pytest.mark.parametrize("kind", ["empty", "garbage", "expired", "wrong_audience"])
async def test_introspection_of_invalid_tokens_is_inactive_not_an_error(config, mesh, oauth, kind):
    token = {
        "empty": "",
        "garbage": "abc.def.ghi",
        "expired": mesh.token(["calculator:use"], now=1_000_000, ttl_s=60),
        "wrong_audience": mesh.token(["calculator:use"], audience="elsewhere"),
    }[kind]
    info = await oauth.IntrospectToken(introspect(config, token))
    assert info == oauth_pb2.IntrospectTokenResponse(active=False)


async def test_introspection_needs_an_authenticated_client_with_the_scope(config, oauth, fails_with):
    token = (await oauth.IssueToken(grant(config))).access_token
    anonymous = oauth_pb2.IntrospectTokenRequest(token=token)
    await fails_with(oauth.IntrospectToken(anonymous), grpc.StatusCode.INVALID_ARGUMENT, "client_id is required")
    wrong = oauth_pb2.IntrospectTokenRequest(token=token, client_id="admin", client_secret="guess")
    await fails_with(oauth.IntrospectToken(wrong), grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
    await fails_with(
        oauth.IntrospectToken(introspect(config, token, client_id="mole")),
        grpc.StatusCode.PERMISSION_DENIED,
        "oauth:introspect",
    )


async def test_a_token_issued_for_a_session_is_bound_to_it(config, oauth):
    response = await oauth.IssueToken(grant(config), metadata=[("x-session-id", "heist_bound_1")])
    assert response.session_id == "heist_bound_1"
    info = await oauth.IntrospectToken(introspect(config, response.access_token))
    assert info.active and info.session_id == "heist_bound_1"
    assert jwt.decode(response.access_token, options={"verify_signature": False})["sid"] == "heist_bound_1"


async def test_repeated_failed_secrets_make_the_client_wait(config, oauth, fails_with):
    for _ in range(3):  # the free attempts
        await fails_with(oauth.IssueToken(grant(config, secret="guess")), grpc.StatusCode.UNAUTHENTICATED, "invalid")
    await fails_with(oauth.IssueToken(grant(config, secret="guess")), grpc.StatusCode.UNAUTHENTICATED, "invalid")
    # Now locked out for a while, even with the right secret: guessing costs time, not just a round trip.
    await fails_with(oauth.IssueToken(grant(config)), grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in")
    other = await oauth.IssueToken(grant(config, client_id="hacker"))
    assert other.access_token, "another client is not affected"


async def test_one_callers_failed_secrets_never_make_another_caller_wait(config, mesh, oauth, fails_with):
    for _ in range(6):  # this caller (the orchestrator's certificate) guesses until it must wait
        with pytest.raises(grpc.aio.AioRpcError):
            await oauth.IssueToken(grant(config, secret="guess"))
    await fails_with(oauth.IssueToken(grant(config)), grpc.StatusCode.RESOURCE_EXHAUSTED, "from this caller")
    server = mesh.servers["oauth"]
    async with channels.aio_channel(config, "oauth", server.address, identity="grpcurl") as channel:
        other_caller = oauth_pb2_grpc.OAuthServiceStub(channel)
        assert (await other_caller.IssueToken(grant(config))).access_token, "the right secret from another caller"
        await fails_with(other_caller.IssueToken(grant(config, secret="guess")), grpc.StatusCode.UNAUTHENTICATED)
    # ...and its success forgot nothing of the guesser's failures.
    await fails_with(oauth.IssueToken(grant(config)), grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in")


@pytest.mark.parametrize(
    ("peer", "caller"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv4:10.0.0.7:60001", "ipv4:10.0.0.7"),  # another connection (port) is the same caller
        ("ipv6:[2001:db8:1:2:aaaa::1]:443", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:%5B2001:db8:1:2:ffff::9%5D:443", "ipv6:2001:db8:1:2::/64"),  # the /64 is one caller, escaped or not
        ("ipv6:[::ffff:10.0.0.7]:443", "ipv4:10.0.0.7"),
        ("unix:/run/heist/oauth.sock", "unix"),
        ("", "unknown"),
    ],
)
def test_a_caller_is_its_host_not_its_connection(peer, caller):
    assert peer_host(peer) == caller


def test_failed_secrets_are_per_caller_bounded_and_doubling():
    failures = FailedSecrets(FailedSecretsConfig(free_failures=2, max_lockout_s=5.0, tracked=100))
    assert [failures.failed("mole", "ipv4:10.0.0.7", 0.0) for _ in range(3)] == [False, False, True]
    assert failures.wait_s("mole", "ipv4:10.0.0.7", 0.0) == 1.0
    assert failures.wait_s("mole", "ipv4:10.0.0.8", 0.0) == 0.0 and failures.wait_s("hacker", "ipv4:10.0.0.7", 0) == 0
    for now in (1.0, 3.0, 7.0, 12.0, 17.0):  # after each wait, one more failure: 2, 4, then capped at 5 s
        failures.failed("mole", "ipv4:10.0.0.7", now)
    assert failures.wait_s("mole", "ipv4:10.0.0.7", 17.0) == 5.0
    for index in range(500):  # many unknown client ids
        failures.failed(f"stranger-{index}", "ipv4:10.0.0.9", 0.0)
    assert len(failures) == 100, "the oldest records are forgotten"
    failures.succeeded("mole", "ipv4:10.0.0.7")
    assert failures.wait_s("mole", "ipv4:10.0.0.7", 17.0) == 0.0


async def test_attacker_input_is_not_echoed_at_length(config, oauth, fails_with):
    huge = "x" * 1_000_000
    message = await fails_with(
        oauth.IssueToken(grant(config, grant_type=huge)), grpc.StatusCode.INVALID_ARGUMENT, "unsupported grant_type"
    )
    assert len(message) < 200
    message = await fails_with(
        oauth.IssueToken(grant(config, scopes=["y" * 10_000] * 50)), grpc.StatusCode.PERMISSION_DENIED, "may not"
    )
    assert len(message) < 600


async def test_signing_keys_publish_the_verification_key(config, oauth):
    response = await oauth.GetSigningKeys(oauth_pb2.GetSigningKeysRequest())
    assert response.issuer == "heist-oauth" and response.audience == "heist-mesh"
    (key,) = response.keys
    assert key.algorithm == "EdDSA"
    published = serialization.load_pem_public_key(key.public_key_pem.encode())
    assert published == credential_store.public_key(config)
    token = (await oauth.IssueToken(grant(config))).access_token
    assert jwt.get_unverified_header(token)["kid"] == key.key_id
