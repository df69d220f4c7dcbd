#pragma once
// Boost.Beast and Asio under the short names the control plane's server and
// client both use (`using namespace mdi::beast_names;` inside their .cpp only).
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace mdi::beast_names {
namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
}  // namespace mdi::beast_names
