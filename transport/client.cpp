#include "transport/client.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "transport/security.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace moesh {

Client::Client(const std::string & endpoint, const CurveClientKeys & curve)
    : ctx_(std::make_unique<zmq::context_t>(1)), endpoint_(endpoint) {
    sock_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::dealer);
    sock_->set(zmq::sockopt::linger, 0);
    if (!curve.server_public.empty()) {
        if (!security::is_z85_key(curve.server_public))
            throw std::runtime_error("the server's public key is not a 40-character Z85 key");
        security::CurveCert mine;
        if (curve.client_secret.empty()) mine = security::new_curve_cert();
        else mine = security::parse_curve_cert(curve.client_secret, "the client's secret key", true);
        public_key_ = mine.public_key;
        sock_->set(zmq::sockopt::curve_serverkey, curve.server_public);
        sock_->set(zmq::sockopt::curve_publickey, mine.public_key);
        sock_->set(zmq::sockopt::curve_secretkey, mine.secret_key);
    }
    // Handshake outcomes, so a refusal is an error that says why rather than a silent timeout.
    const std::string monitor_at = "inproc://moesh-client-monitor";
    if (zmq_socket_monitor(sock_->handle(), monitor_at.c_str(),
                           ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                               ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) == 0) {
        monitor_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::pair);
        monitor_->set(zmq::sockopt::linger, 0);
        monitor_->connect(monitor_at);
    }
    try {
        sock_->connect(endpoint);
    } catch (const zmq::error_t & e) {
        throw std::runtime_error("cannot connect to " + endpoint + ": " + e.what());
    }
}

void Client::read_events() {
    while (monitor_) {
        std::vector<zmq::message_t> ev;
        if (!zmq::recv_multipart(*monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait) || ev.size() < 2 || ev[0].size() < 6) return;
        uint16_t event;
        uint32_t value;
        std::memcpy(&event, ev[0].data(), 2);
        std::memcpy(&value, static_cast<const char *>(ev[0].data()) + 2, 4);
        switch (event) {
        case ZMQ_EVENT_CONNECTED: ++connects_; break;
        case ZMQ_EVENT_DISCONNECTED: ++disconnects_; break;
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED: ++handshakes_; break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
            throw std::runtime_error("the server at " + endpoint_ + " refused this client's CURVE key (ZAP status " + std::to_string(value) +
                                     "): its operator must add the client's public key " + public_key_ +
                                     " to the server's curve_authorized_keys");
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if (value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
                throw std::runtime_error(public_key_.empty()
                                             ? "the server at " + endpoint_ + " requires CURVE: give its public key (the NAME.key certificate "
                                                                              "its operator made with `moesh keygen`)"
                                             : "the server at " + endpoint_ + " does not use CURVE: connect without its key");
            {
                char hex[16];
                std::snprintf(hex, sizeof hex, "0x%x", value);
                throw std::runtime_error("the handshake with " + endpoint_ + " failed (ZMTP protocol error " + hex + ")");
            }
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            throw std::runtime_error("the handshake with " + endpoint_ + " failed: " +
                                     (public_key_.empty() ? "the server may require CURVE (give its public key)"
                                                          : "is the server key its public key, and does it use CURVE?"));
        default: break;
        }
    }
}

std::string Client::connection_note() const {
    if (connects_ == 0) return "never connected to " + endpoint_ + ": is a server listening there?";
    if (handshakes_ == 0 && disconnects_ > 0)
        return "connected to " + endpoint_ + " " + std::to_string(connects_) + " times, but the server closed every connection before the handshake ended" +
               (public_key_.empty() ? std::string() : ": is the server key this server's public key?");
    return "";
}

Client::~Client() = default;

void Client::send(const nlohmann::json & request) { send_raw(request.dump()); }

void Client::send_raw(const std::string & bytes) {
    if (!sock_->send(zmq::buffer(bytes), zmq::send_flags::dontwait))
        throw std::runtime_error("cannot queue the request: the connection's send queue is full");
}

std::optional<protocol::Response> Client::receive(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        zmq::pollitem_t items[2] = {{sock_->handle(), 0, ZMQ_POLLIN, 0}, {monitor_ ? monitor_->handle() : nullptr, 0, ZMQ_POLLIN, 0}};
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (zmq::poll(items, monitor_ ? 2 : 1, std::max(left, std::chrono::milliseconds(0))) <= 0) return std::nullopt;
        if (items[1].revents & ZMQ_POLLIN) read_events();
        if (items[0].revents & ZMQ_POLLIN) break;
    }
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
