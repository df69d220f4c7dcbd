#include "common/wire/nodes_config.hpp"

#include <fstream>
#include <functional>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support.hpp"

namespace mdi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

json three_nodes() {
  return json::parse(R"({
    "nodes": {
      "starter": {"addr": "10.0.0.1", "communication": {"port": 8088},
                  "inference": {"port_in": 5088, "port_out": 5089}, "device": "cuda:0"},
      "secondary": [
        {"addr": "10.0.0.2", "communication": {"starter_addr": "10.0.0.1", "port": 8089},
         "inference": {"port_in": 5090, "port_out": 5091}},
        {"addr": "10.0.0.3", "bind_addr": "0.0.0.0", "communication": {"starter_addr": "10.0.0.1", "port": 8090},
         "inference": {"port_in": 5092, "port_out": 5093}, "device": "cpu"}
      ]
    }
  })");
}

// What parse_nodes_config says about three_nodes() after `edit`.
std::string error_after(const std::function<void(json&)>& edit) {
  json j = three_nodes();
  edit(j);
  return test::error_of<ConfigError>([&] { parse_nodes_config(j, "test.json"); });
}

TEST(NodesConfig, ParsesEveryField) {
  const NodesConfig c = parse_nodes_config(three_nodes(), "test.json");
  ASSERT_EQ(c.n_nodes(), 3u);
  EXPECT_EQ(c.starter.addr, "10.0.0.1");
  EXPECT_EQ(c.starter.bind_addr, "10.0.0.1");
  EXPECT_EQ(c.starter.control_port, 8088);
  EXPECT_EQ(c.starter.port_in, 5088);
  EXPECT_EQ(c.starter.port_out, 5089);
  EXPECT_EQ(c.starter.device, "cuda:0");
  EXPECT_EQ(c.starter.starter_addr, "");
  EXPECT_EQ(c.node(1).starter_addr, "10.0.0.1");
  EXPECT_EQ(c.node(1).device, "");
  EXPECT_EQ(c.node(2).bind_addr, "0.0.0.0");
  EXPECT_EQ(c.node(2).port_in, 5092);
  EXPECT_EQ(c.timeouts.connect, 30s);
  EXPECT_EQ(c.timeouts.accept, 30s);
  EXPECT_EQ(c.timeouts.receive, 10s);
  EXPECT_EQ(c.timeouts.http_init, 60s);
  EXPECT_EQ(c.timeouts.heartbeat, 1s);
  EXPECT_EQ(c.auth_token, "");
  EXPECT_EQ(c.max_frame_bytes, 1ull << 30);
}

TEST(NodesConfig, RingNeighbours) {
  const NodesConfig c = parse_nodes_config(three_nodes(), "test.json");
  EXPECT_EQ(c.next(0), 1u);
  EXPECT_EQ(c.next(2), 0u);
  EXPECT_EQ(c.prev(0), 2u);
  EXPECT_EQ(c.prev(1), 0u);
  EXPECT_THROW(c.node(3), std::out_of_range);
  EXPECT_THROW(c.next(3), std::out_of_range);
}

TEST(NodesConfig, Extensions) {
  json j = three_nodes();
  j["timeouts"] = {{"connect_s", 5}, {"receive_s", 0.3}, {"heartbeat_s", 0.1}};
  j["nodes"]["auth_token"] = "secret";
  j["max_frame_bytes"] = 4096;
  const NodesConfig c = parse_nodes_config(j, "test.json");
  EXPECT_EQ(c.timeouts.connect, 5s);
  EXPECT_EQ(c.timeouts.receive, 300ms);
  EXPECT_EQ(c.timeouts.heartbeat, 100ms);
  EXPECT_EQ(c.timeouts.accept, 30s);
  EXPECT_EQ(c.auth_token, "secret");
  EXPECT_EQ(c.max_frame_bytes, 4096u);
}

TEST(NodesConfig, MissingFieldsNameTheirPath) {
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["starter"].erase("addr"); }),
            "test.json: nodes.starter.addr: missing required field");
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["secondary"][1]["inference"].erase("port_out"); }),
            "test.json: nodes.secondary[1].inference.port_out: missing required field");
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["secondary"][0]["communication"].erase("starter_addr"); }),
            "test.json: nodes.secondary[0].communication.starter_addr: missing required field");
  EXPECT_EQ(error_after([](json& j) { j["nodes"].erase("secondary"); }),
            "test.json: nodes.secondary: expected an array (use [] for a standalone run)");
  EXPECT_EQ(error_after([](json& j) { j.erase("nodes"); }), "test.json: nodes: missing required field");
}

TEST(NodesConfig, BadPorts) {
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["secondary"][1]["inference"]["port_in"] = 70000; }),
            "test.json: nodes.secondary[1].inference.port_in: expected an integer 1..65535, got 70000");
  EXPECT_THAT(error_after([](json& j) { j["nodes"]["starter"]["communication"]["port"] = 0; }),
              HasSubstr("nodes.starter.communication.port: expected an integer 1..65535"));
  EXPECT_THAT(error_after([](json& j) { j["nodes"]["starter"]["inference"]["port_in"] = "5088"; }),
              HasSubstr("nodes.starter.inference.port_in: expected an integer"));
}

TEST(NodesConfig, DuplicatePortsOnOneAddress) {
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["starter"]["inference"]["port_out"] = 5088; }),
            "test.json: nodes.starter.inference.port_out: port 5088 on 10.0.0.1 is already used by "
            "nodes.starter.inference.port_in");
  EXPECT_THAT(error_after([](json& j) {
                j["nodes"]["secondary"][0]["addr"] = "10.0.0.1";
                j["nodes"]["secondary"][0]["communication"]["port"] = 8088;
              }),
              HasSubstr("nodes.secondary[0].communication.port: port 8088 on 10.0.0.1 is already used by "
                        "nodes.starter.communication.port"));
  // The same port on different addresses is fine.
  EXPECT_EQ(error_after([](json& j) { j["nodes"]["secondary"][0]["inference"]["port_in"] = 5088; }), "");
}

TEST(NodesConfig, BadExtensions) {
  EXPECT_THAT(error_after([](json& j) {
                j["timeouts"] = {{"recieve_s", 3}};
              }),
              HasSubstr("timeouts.recieve_s: unknown timeout"));
  EXPECT_THAT(error_after([](json& j) {
                j["nodes"]["timeouts"] = {{"connect_s", -1}};
              }),
              HasSubstr("nodes.timeouts.connect_s: expected a number of seconds"));
  EXPECT_THAT(error_after([](json& j) {
                j["timeouts"] = {{"receive_s", 1}};
              }),
              HasSubstr("timeouts.heartbeat_s: must be at most half of receive_s"));
  EXPECT_THAT(error_after([](json& j) {
                j["auth_token"] = "a";
                j["nodes"]["auth_token"] = "b";
              }),
              HasSubstr("auth_token: given both at the top level and in \"nodes\""));
  EXPECT_THAT(error_after([](json& j) { j["max_frame_bytes"] = 0; }),
              HasSubstr("max_frame_bytes: expected a positive"));
}

TEST(NodesConfig, SecondaryOnlyObject) {
  const json own = three_nodes()["nodes"]["secondary"][1];
  EXPECT_TRUE(is_single_secondary_object(own));
  EXPECT_FALSE(is_single_secondary_object(three_nodes()));
  const NodeEndpoint node = parse_secondary_only(own, "secondary.json");
  EXPECT_EQ(node.addr, "10.0.0.3");
  EXPECT_EQ(node.bind_addr, "0.0.0.0");
  EXPECT_EQ(node.starter_addr, "10.0.0.1");
  EXPECT_EQ(node.control_port, 8090);
  EXPECT_EQ(node.port_in, 5092);
  EXPECT_EQ(node.port_out, 5093);

  json bad = own;
  bad["inference"].erase("port_in");
  EXPECT_EQ(test::error_of<ConfigError>([&] { parse_secondary_only(bad, "secondary.json"); }),
            "secondary.json: inference.port_in: missing required field");
  // The full parser points a user who passed a secondary's object at the right form.
  EXPECT_THROW(parse_nodes_config(own, "secondary.json"), ConfigError);
}

void expect_every_config_parses(const fs::path& dir, size_t at_least) {
  size_t parsed = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".json") continue;
    SCOPED_TRACE(entry.path().string());
    const NodesConfig c = load_nodes_config(entry.path());
    EXPECT_GE(c.n_nodes(), 1u);
    ++parsed;
  }
  EXPECT_GE(parsed, at_least);
}

TEST(NodesConfig, EveryShippedExampleParses) {
  expect_every_config_parses(test::source_dir() / "configs", 4);
  const NodesConfig edge = load_nodes_config(test::source_dir() / "configs" / "edge-3nodes-lan.json");
  EXPECT_EQ(edge.n_nodes(), 3u);
  EXPECT_EQ(edge.timeouts.receive, 20s);
  EXPECT_FALSE(edge.auth_token.empty());
  const NodesConfig gpus = load_nodes_config(test::source_dir() / "configs" / "2gpus.json");
  EXPECT_EQ(gpus.starter.device, "cuda:0");
  EXPECT_EQ(gpus.node(1).device, "cuda:1");
}

TEST(NodesConfig, MdiLlmFilesParseUnchanged) {
  MDI_REQUIRE_SHARED(shared);
  expect_every_config_parses(shared / "mdi-configs", 3);
  EXPECT_EQ(load_nodes_config(shared / "mdi-configs" / "standalone.json").n_nodes(), 1u);
  EXPECT_EQ(load_nodes_config(shared / "mdi-configs" / "configuration.json").n_nodes(), 3u);
  EXPECT_EQ(load_nodes_config(shared / "mdi-configs" / "config_2gpus.json").node(1).device, "cuda:1");
}

TEST(NodesConfig, FileErrorsNameTheFile) {
  test::ScratchDir dir;
  { std::ofstream(dir / "broken.json") << "{\"nodes\": "; }
  EXPECT_THAT(test::error_of<ConfigError>([&] { load_nodes_config(dir / "broken.json"); }), HasSubstr("broken.json: invalid JSON"));
  EXPECT_THROW(load_nodes_config(dir / "absent.json"), ConfigError);
}

}  // namespace
}  // namespace mdi
