// Who may use `moesh serve` when it listens beyond loopback (docs/PROTOCOL.md, "Security"):
//
// - ZeroMQ CURVE on the ROUTER endpoint: traffic encrypted, the server known by its public key,
//   clients optionally limited to a list of public keys (checked by a ZAP handler, ZeroMQ's RFC 27).
//   Keys are CurveZMQ's 32-byte keys written as 40 Z85 characters. Certificate files use the
//   format CZMQ and pyzmq write (`NAME.key` holds `public-key = "..."`, `NAME.key_secret` adds
//   `secret-key = "..."`), so `zmq.auth.load_certificate` reads ours and we read theirs.
// - HTTP API keys: `Authorization: Bearer KEY` on /v1/ routes, as OpenAI's clients send it.
//
// Every file here is untrusted input: a bad one is refused with its name, line and what is wrong.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace zmq {
class context_t;
} // namespace zmq

namespace moesh::security {

struct CurveCert {
    std::string public_key;   // 40 Z85 characters
    std::string secret_key;   // 40 Z85 characters, or "" in a public certificate
};

// A fresh key pair (libsodium's random source through libzmq). Throws std::runtime_error when
// this libzmq was built without CURVE.
CurveCert new_curve_cert();

// True when text is 40 Z85 characters (a 32-byte key).
bool is_z85_key(std::string_view text);

// A certificate's text: `public-key = "..."` and optionally `secret-key = "..."` lines (ZPL;
// a line starting with '#' is a comment), or a bare key on a line of its own (taken as the secret key when
// want_secret, else as the public key). With a secret key, the public key is derived from it and
// a `public-key` line that does not match is an error. Throws std::runtime_error naming
// source and line.
CurveCert parse_curve_cert(std::string_view text, std::string_view source, bool want_secret);
CurveCert load_curve_cert(const std::string & path, bool want_secret);

// A certificate's text: the public key, and the secret key too when secret.
std::string curve_cert_text(const CurveCert & cert, bool secret);

// Writes DIR/NAME.key (public) and DIR/NAME.key_secret (both keys, mode 0600); refuses to replace
// existing files. Returns the two paths.
std::pair<std::string, std::string> write_curve_cert(const std::string & dir, const std::string & name, const CurveCert & cert);

// Clients allowed to connect: a directory of public certificates (every `*.key` file, CZMQ's and
// pyzmq's convention), or a file with one Z85 public key per line (a line starting with '#' is a comment). An
// empty list is an error: it would shut every client out.
std::vector<std::string> parse_key_list(std::string_view text, std::string_view source);
std::vector<std::string> load_authorized_keys(const std::string & path);

// HTTP API keys: one per line (lines starting with '#' and blank lines skipped), each 16 to 512
// visible ASCII characters without spaces. At least one.
std::vector<std::string> parse_api_keys(std::string_view text, std::string_view source);
std::vector<std::string> load_api_keys(const std::string & path);

enum class ApiKeyCheck { Ok, Missing, Malformed, Wrong };
// An Authorization header's value against the keys: "Bearer KEY" (scheme case-insensitive).
// Compares in time that does not depend on where a key differs.
ApiKeyCheck check_api_key(const std::vector<std::string> & keys, std::string_view authorization);

// The ZAP handler of one context: answers libzmq's authentication requests on
// inproc://zeromq.zap.01 from its own thread. CURVE clients whose public key is in the list are
// let in (every CURVE client while the list is empty); others are refused (and counted, and
// reported through on_deny, at most once per second with the count since). Create it before
// binding a CURVE socket of that context.
class ZapHandler {
public:
    ZapHandler(zmq::context_t & ctx, std::vector<std::string> allowed_z85, std::function<void(const std::string &)> on_deny);
    // Replaces the list (any thread); connections made from then on are checked against it.
    void set_allowed(const std::vector<std::string> & allowed_z85);
    ~ZapHandler();   // stops the thread
    ZapHandler(const ZapHandler &) = delete;
    ZapHandler & operator=(const ZapHandler &) = delete;

    uint64_t allowed() const { return allowed_.load(); }
    uint64_t denied() const { return denied_.load(); }

private:
    void loop(void * socket);
    bool allows(const std::string & key);
    std::mutex mu_;                   // guards keys_
    std::vector<std::string> keys_;   // 32-byte binary keys, sorted
    std::function<void(const std::string &)> on_deny_;
    std::atomic<bool> stop_{false};
    std::atomic<uint64_t> allowed_{0}, denied_{0};
    std::thread thread_;
};

} // namespace moesh::security
