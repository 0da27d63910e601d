// The HTTP front of `moesh serve` (Boost.Beast on Boost.Asio, one thread):
// OpenAI-compatible POST /v1/completions and /v1/chat/completions (JSON, or
// server-sent events with "stream": true), GET /v1/models, /health and
// /metrics. Requests become protocol frames on a LocalPort (transport/openai.h
// translates); the server's loop answers them like ZeroMQ requests, so both
// fronts share one scheduler, one set of checks and one set of counters.
//
//   LocalPort port;
//   HttpFront http(options, port);
//   http.start();             // listening before the model loads: /health says 503 "loading"
//   ... server.attach(port); server.run(stop); ...
//   http.stop();
//
// Untrusted peers: a request's header and body must arrive within
// request_timeout_s (else the connection is closed) and fit the header and
// body limits (else 431/413, then the connection is closed); connections
// beyond max_connections get 503 at once.
// A client that disconnects while its request runs cancels it; one that reads
// too slowly (max_pending_bytes behind) has it cancelled too.
//
// Thread safety: start/stop from one thread; stop_accepting from any thread.
#pragma once

#include "transport/local_port.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moesh {

struct HttpOptions {
    std::string address = "127.0.0.1";
    uint16_t port = 8080;              // 0: a free port (see url())
    int64_t max_connections = 256;
    int64_t max_body_bytes = 1 << 20;
    double request_timeout_s = 30;     // to receive one request's header and body; also the keep-alive idle limit
    int64_t max_pending_bytes = 4 << 20;   // reply bytes queued for a slow reader before its request is cancelled
    int64_t default_max_tokens = 16;   // a request without max_tokens (OpenAI's default for completions)
    int64_t default_chat_max_tokens = 256;   // a chat request without max_tokens
    std::string model_name = "moesh";
    // When not empty, /v1/ routes need "Authorization: Bearer KEY" with one of these (else 401);
    // /health and /metrics stay open (load balancers and scrapers; they carry no text).
    std::vector<std::string> api_keys;
};

class HttpFront {
public:
    HttpFront(HttpOptions options, LocalPort & port);
    ~HttpFront();   // stop()
    HttpFront(const HttpFront &) = delete;
    HttpFront & operator=(const HttpFront &) = delete;

    // Binds and starts serving on its own thread. Throws std::runtime_error
    // naming the address and what to do (in use, not an address).
    void start();
    std::string url() const;   // "http://127.0.0.1:8080": the address actually bound
    void stop_accepting();     // SIGTERM: no new connections; /health answers 503 "draining"
    // Replaces the API keys (any thread; empty: /v1/ routes open); requests read from then on use them.
    void set_api_keys(std::vector<std::string> keys);
    void stop();               // closes every connection, joins the thread

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

} // namespace moesh
