// Access-token timing: when to ask the app for a fresh token.

/**
 * Reads `exp` and `iat` (seconds since the epoch) from a JWT without verifying it; `null`
 * when the token is not a readable JWT.
 * @param {string} token
 * @returns {{ exp: number, iat: number | null } | null}
 */
export function tokenTimes(token) {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    if (typeof json.exp !== "number") return null;
    return { exp: json.exp, iat: typeof json.iat === "number" ? json.iat : null };
  } catch {
    return null;
  }
}

/**
 * Milliseconds from `nowMs` until the token should be refreshed: a quarter of its lifetime
 * before `exp`, at least 5 s and at most 60 s before; never less than 1 s from now. `null`
 * when the token carries no readable `exp`.
 * @param {string} token
 * @param {number} nowMs
 * @returns {number | null}
 */
export function refreshDelayMs(token, nowMs) {
  const t = tokenTimes(token);
  if (!t) return null;
  const lifetime = t.iat !== null ? t.exp - t.iat : t.exp - nowMs / 1000;
  const margin = Math.min(60, Math.max(5, lifetime / 4));
  return Math.max(1000, Math.round((t.exp - margin) * 1000 - nowMs));
}
