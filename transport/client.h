// A C++ client of `moesh serve` (docs/PROTOCOL.md): a ZeroMQ DEALER that sends
// one JSON request per frame and reads the server's frames back.
//
//   moesh::Client c("tcp://127.0.0.1:5555");
//   c.send({{"id", "a"}, {"prompt", "def add(a, b):"}, {"max_tokens", 16}, {"stream", true}});
//   while (auto f = c.receive(std::chrono::seconds(30))) {   // token frames, then done or error
//       if (f->type == "done" || f->type == "error") break;
//   }
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

class Client {
public:
    explicit Client(const std::string & endpoint);   // throws std::runtime_error for a bad endpoint
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

private:
    std::unique_ptr<zmq::context_t> ctx_;
    std::unique_ptr<zmq::socket_t> sock_;
};

} // namespace moesh
