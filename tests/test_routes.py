"""Route matching: the compiled table must agree with `Route.matches`, first match wins."""

from __future__ import annotations

import itertools

import pytest

from proxy.config import Route, RouteTable

ROUTES = (
    Route(path="/search", methods=frozenset({"GET"}), cost=5),
    Route(path="/health", exempt=True),
    Route(path="/a.b/", methods=frozenset({"POST", "PUT"})),  # trailing slash: a plain prefix
    Route(path="/search", cost=2),  # reached only by methods other than GET
    Route(path="/x+(y)"),  # regex metacharacters are literal
)
PATHS = ["/", "/search", "/search/", "/search/x", "/searching", "/health", "/health/deep", "/healthz",
         "/a.b/", "/a.b/c", "/a.b", "/axb/c", "/x+(y)", "/x+(y)/z", "/xx(y)", "/search\n", "/health\n/x",
         "/a%0Ab", "/SEARCH"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PROPFIND"]


def first_match(routes: tuple[Route, ...], method: str, path: str) -> Route | None:
    return next((route for route in routes if route.matches(method, path)), None)


@pytest.mark.parametrize("method,path", list(itertools.product(METHODS, PATHS)))
def test_the_table_agrees_with_route_matches(method, path):
    assert RouteTable(ROUTES).match(method, path) is first_match(ROUTES, method, path)


def test_first_match_wins_and_methods_filter():
    table = RouteTable(ROUTES)
    assert table.match("GET", "/search/q") is ROUTES[0]
    assert table.match("POST", "/search/q") is ROUTES[3]
    assert table.match("GET", "/searching") is None


def test_a_root_route_matches_everything_and_no_routes_match_nothing():
    root = (Route(path="/", cost=3),)
    assert RouteTable(root).match("GET", "/anything/at/all") is root[0]
    assert RouteTable(()).match("GET", "/") is None
