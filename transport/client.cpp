#include "transport/client.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <stdexcept>

namespace moesh {

Client::Client(const std::string & endpoint) : ctx_(std::make_unique<zmq::context_t>(1)) {
    sock_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::dealer);
    sock_->set(zmq::sockopt::linger, 0);
    try {
        sock_->connect(endpoint);
    } catch (const zmq::error_t & e) {
        throw std::runtime_error("cannot connect to " + endpoint + ": " + e.what());
    }
}

Client::~Client() = default;

void Client::send(const nlohmann::json & request) { send_raw(request.dump()); }

void Client::send_raw(const std::string & bytes) {
    if (!sock_->send(zmq::buffer(bytes), zmq::send_flags::dontwait))
        throw std::runtime_error("cannot queue the request: the connection's send queue is full");
}

std::optional<protocol::Response> Client::receive(std::chrono::milliseconds timeout) {
    zmq::pollitem_t item{sock_->handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, timeout) <= 0) return std::nullopt;
    std::vector<zmq::message_t> parts;
    if (!zmq::recv_multipart(*sock_, std::back_inserter(parts), zmq::recv_flags::dontwait) || parts.empty()) return std::nullopt;
    auto r = protocol::parse_response(parts.back().to_string_view());
    if (auto * e = std::get_if<protocol::ParseError>(&r)) return protocol::Response{"invalid", "", {{"error", e->message}}};
    return std::get<protocol::Response>(r);
}

std::optional<protocol::Response> Client::request(const nlohmann::json & req, std::chrono::milliseconds timeout,
                                        const std::function<void(const protocol::Response &)> & on_token) {
    send(req);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    const std::string id = req.contains("id") && req["id"].is_string() ? req["id"].get<std::string>() : "";
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) return std::nullopt;
        auto f = receive(left);
        if (!f) return std::nullopt;
        if (!id.empty() && !f->id.empty() && f->id != id) continue;   // another request's frame
        if (f->type == "token") {
            if (on_token) on_token(*f);
            continue;
        }
        return f;
    }
}

} // namespace moesh
