import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from heist.oauth.v1 import oauth_pb2, oauth_pb2_grpc

from servers import credentials


@pytest.fixture
async def oauth(mesh):
    return oauth_pb2_grpc.OAuthServiceStub(await mesh.channel("oauth"))


def grant(config, client_id="safecracker", scopes=(), secret=None, grant_type="client_credentials"):
    if secret is None:
        secret = credentials.client_secret(config, client_id)
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
        response.access_token, credentials.public_key(config), algorithms=["EdDSA"], audience="heist-mesh"
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


async def test_introspection_reports_active_tokens(config, mesh, oauth):
    token = (await oauth.IssueToken(grant(config))).access_token
    info = await oauth.IntrospectToken(oauth_pb2.IntrospectTokenRequest(token=token))
    assert info.active and info.client_id == "safecracker" and list(info.scopes) == ["calculator:use"]
    assert info.issuer == "heist-oauth" and info.audience == "heist-mesh" and info.token_type == "Bearer"
    assert info.expires_at - info.issued_at == 900


@pytest.mark.parametrize("kind", ["empty", "garbage", "expired", "wrong_audience"])
async def test_introspection_of_invalid_tokens_is_inactive_not_an_error(mesh, oauth, kind):
    token = {
        "empty": "",
        "garbage": "abc.def.ghi",
        "expired": mesh.token(["calculator:use"], now=1_000_000, ttl_s=60),
        "wrong_audience": mesh.token(["calculator:use"], audience="elsewhere"),
    }[kind]
    info = await oauth.IntrospectToken(oauth_pb2.IntrospectTokenRequest(token=token))
    assert info == oauth_pb2.IntrospectTokenResponse(active=False)


async def test_signing_keys_publish_the_verification_key(config, oauth):
    response = await oauth.GetSigningKeys(oauth_pb2.GetSigningKeysRequest())
    assert response.issuer == "heist-oauth" and response.audience == "heist-mesh"
    (key,) = response.keys
    assert key.algorithm == "EdDSA"
    published = serialization.load_pem_public_key(key.public_key_pem.encode())
    assert published == credentials.public_key(config)
    token = (await oauth.IssueToken(grant(config))).access_token
    assert jwt.get_unverified_header(token)["kid"] == key.key_id
