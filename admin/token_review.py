"""ServiceAccount tokens for the admin API: a bearer token the tokens file does not hold is
asked of Kubernetes (a TokenReview), and a ServiceAccount the file lists under
`serviceAccounts` gets the role it names there. So the operator sends its records with its
own projected token, which the kubelet rotates, and no copy of it is kept anywhere. Answers
are kept for `ttl` seconds by the token's hash (at most `max_cached`), so a flood of
requests is not a flood of reviews; a review that fails (the API server unreachable) is
not kept, and the request is refused with 401."""

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .auth import Principal, TokenFile, digest

log = logging.getLogger(__name__)


class ReviewedTokens:
    def __init__(self, tokens: TokenFile, review: Callable[[str], str | None], ttl: float = 60.0,
                 max_cached: int = 1000) -> None:
        """`review`: the user a token authenticates as, or None (`Kube.review_token`)."""
        self.tokens, self.review, self.ttl, self.max_cached = tokens, review, ttl, max_cached
        self.cache: OrderedDict[str, tuple[Principal | None, float]] = OrderedDict()
        self.lock = threading.Lock()

    def lookup(self, token: str) -> Principal | None:
        found = self.tokens.lookup(token)
        if found is not None or not token:
            return found
        key, now = digest(token), time.monotonic()
        with self.lock:
            hit = self.cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            user = self.review(token)
        except Exception as e:  # the API server's trouble is not the caller's
            log.warning("TokenReview failed: %s", e)
            return None
        role = self.tokens.book.accounts.get(user) if user else None
        principal = Principal(user, role) if user and role else None
        with self.lock:
            self.cache[key] = (principal, now + self.ttl)
            self.cache.move_to_end(key)
            while len(self.cache) > self.max_cached:
                self.cache.popitem(last=False)
        return principal
