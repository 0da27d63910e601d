// A C++ client of `moesh serve` (docs/PROTOCOL.md): a ZeroMQ DEALER that sends
// one JSON request per frame and reads the server's frames back.
//
//   moesh::Client c("tcp://127.0.0.1:5555");
//   c.send({{"id", "a"}, {"prompt", "def add(a, b):"}, {"max_tokens", 16}, {"stream", true}});
//   while (auto f = c.receive(std::chrono::seconds(30))) {   // token frames, then done or error
//       if (f->type == "done" || f->type == "error") break;
//   }
//
// With CURVE (a server with curve_secret_key): give the server's public key, and this client's
// secret key when the server lets in only listed clients (else a fresh key pair is made).
//   moesh::Client c("tcp://10.0.0.5:5555", {server_pub, my_secret});
// A server that refuses the key, or a handshake that fails, is reported by receive() and
// request() as a std::runtime_error saying what to do, not as a silent timeout.
//
// Thread safety: one thread per Client.
#pragma once

#include "transport/protocol.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace zmq {
class context_t;
class socket_t;
} // namespace zmq

namespace moesh {

struct CurveClientKeys {
    std::string server_public;   // Z85 (40 characters); "" for no CURVE
    std::string client_secret;   // Z85; "" for a fresh key pair
};

class Client {
public:
    // Throws std::runtime_error for a bad endpoint or key.
    explicit Client(const std::string & endpoint, const CurveClientKeys & curve = {});
    ~Client();
    Client(const Client &) = delete;
    Client & operator=(const Client &) = delete;

    void send(const nlohmann::json & request);   // throws std::runtime_error when it cannot be queued
    void send_raw(const std::string & bytes);    // anything, for tests of the server's input checks
    // The next frame, parsed; nullopt on timeout. A frame that is not a valid response becomes
    // a Response of type "invalid" whose body holds the parse error.
    std::optional<protocol::Response> receive(std::chrono::milliseconds timeout);

    // One whole request: send, then collect until its done or error frame (or timeout).
    // Token frames of a streaming request are passed to on_token when given.
    std::optional<protocol::Response> request(const nlohmann::json & req, std::chrono::milliseconds timeout,
                                    const std::function<void(const protocol::Response &)> & on_token = {});

    const std::string & curve_public_key() const { return public_key_; }   // "" without CURVE
    // After a timeout: what the connection saw, when that explains it ("" when nothing does).
    std::string connection_note() const;

private:
    void read_events();   // the socket monitor's events; throws on a refused handshake
    std::unique_ptr<zmq::context_t> ctx_;
    std::unique_ptr<zmq::socket_t> sock_;
    std::unique_ptr<zmq::socket_t> monitor_;
    std::string endpoint_, public_key_;
    int64_t connects_ = 0, handshakes_ = 0, disconnects_ = 0;
};

} // namespace moesh
