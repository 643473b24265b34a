"""Test drivers for the SMART server: an HTML form parser and a user agent that walks the authorize pages.

They act like a browser over real HTTP (requests, cookies, forms); nothing here fakes a server response.
"""
from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from joserfc import jwt


@dataclass
class Form:
    action: str
    method: str
    fields: list = field(default_factory=list)        # (name, value) of hidden/text inputs
    selects: dict = field(default_factory=dict)        # name -> [option values]
    buttons: list = field(default_factory=list)        # (name, value)
    inputs: set = field(default_factory=set)           # names of every input/select


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[Form] = []
        self._select = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif not self.forms:
            return
        elif tag == "input" and a.get("name"):
            form = self.forms[-1]
            form.inputs.add(a["name"])
            if a.get("type") == "checkbox":
                if "checked" in a:
                    form.fields.append((a["name"], a.get("value", "on")))
            else:
                form.fields.append((a["name"], a.get("value", "")))
        elif tag == "select":
            self._select = a.get("name")
            self.forms[-1].selects[self._select] = []
            self.forms[-1].inputs.add(self._select)
        elif tag == "option" and self._select:
            self.forms[-1].selects[self._select].append(a.get("value", ""))
        elif tag == "button" and a.get("name"):
            self.forms[-1].buttons.append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None


def parse_forms(html: str) -> list[Form]:
    parser = _Parser()
    parser.feed(html)
    return parser.forms


def submit(session: requests.Session, page_url: str, form: Form, values: dict | None = None,
           button: tuple | None = None) -> requests.Response:
    """Submit ``form`` as a browser would: its fields, overridden by ``values``, plus the clicked button."""
    values = dict(values or {})
    data = [(k, values.pop(k) if k in values else v) for k, v in form.fields]
    data += [(k, opts[0]) for k, opts in form.selects.items() if k not in values and opts]
    data += list(values.items())
    if button:
        data.append(button)
    url = urljoin(page_url, form.action or page_url)
    return session.request(form.method.upper(), url, data=data, allow_redirects=False)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class UserAgent:
    """A browser-like session that signs in, picks a patient and approves, until it reaches the redirect URI."""

    def __init__(self, username: str = "dr.chen", password: str = "trialtwin") -> None:
        self.session = requests.Session()
        self.username, self.password = username, password
        self.pages: list[str] = []
        self.last_redirect: str | None = None

    def open(self, url: str, max_steps: int = 6) -> requests.Response:
        """GET a page of the authorization server, signing in with a password when it asks; the final page."""
        response = self.session.get(url, allow_redirects=False)
        for _ in range(max_steps):
            if response.is_redirect:
                response = self.session.get(urljoin(response.url, response.headers["Location"]), allow_redirects=False)
                continue
            forms = parse_forms(response.text) if response.status_code in (200, 401) else []
            if forms and "password" in forms[0].inputs:
                self.pages.append(response.url)
                response = submit(self.session, response.url, forms[0],
                                  {"username": self.username, "password": self.password})
                continue
            return response
        raise AssertionError(f"too many redirects opening {url}")

    def follow(self, response: requests.Response, redirect_prefix: str, *, patient: str | None = None,
               decision: str = "approve", max_steps: int = 12) -> dict:
        """Drive pages from ``response`` until a redirect to ``redirect_prefix``; return its query parameters."""
        for _ in range(max_steps):
            if response.is_redirect:
                location = urljoin(response.url, response.headers["Location"])
                if location.startswith(redirect_prefix):
                    self.last_redirect = location
                    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
                response = self.session.get(location, allow_redirects=False)
                continue
            assert response.status_code == 200, (response.status_code, response.text[:500])
            forms = parse_forms(response.text)
            assert forms, f"no form on page {response.url}: {response.text[:300]}"
            form = forms[0]
            self.pages.append(response.url)
            if "password" in form.inputs:
                response = submit(self.session, response.url, form, {"username": self.username, "password": self.password})
            elif "selected_patient" in form.inputs and not form.buttons:
                chosen = patient or (form.selects.get("selected_patient") or [""])[0]
                response = submit(self.session, response.url, form, {"selected_patient": chosen})
            elif form.buttons:
                response = submit(self.session, response.url, form, button=("decision", decision))
            else:
                raise AssertionError(f"unexpected form at {response.url}")
        raise AssertionError("authorization did not finish")


def client_assertion(key, client_id: str, audience: str, *, alg: str = "RS384", kid: str | None = None,
                     exp_in: float = 240, jti: str | None = None, iss: str | None = None,
                     now: float | None = None) -> str:
    """A SMART Backend Services client assertion signed with ``key``."""
    now = time.time() if now is None else now
    header = {"alg": alg, "typ": "JWT"}
    if kid is not None or key.kid:
        header["kid"] = kid if kid is not None else key.kid
    claims = {"iss": iss or client_id, "sub": client_id, "aud": audience, "exp": int(now + exp_in),
              "jti": jti or secrets.token_urlsafe(12)}
    return jwt.encode(header, claims, key, algorithms=[alg])
