// ByteLru: the byte budget of the caches of quantized weights (probes, search candidates).

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "common/byte_lru.h"
#include "support/test_helpers.h"

namespace gradq {
namespace {

TEST(ByteLru, KeepsTheMostRecentlyUsedWithinItsBudget) {
  ByteLru<std::string, int> lru(10);
  lru.insert("a", 1, 4);
  lru.insert("b", 2, 4);
  ASSERT_NE(lru.find("a"), nullptr);  // a is now more recent than b
  EXPECT_EQ(*lru.find("a"), 1);
  lru.insert("c", 3, 4);  // 12 > 10: b, the least recently used, goes
  EXPECT_EQ(lru.find("b"), nullptr);
  EXPECT_NE(lru.find("a"), nullptr);
  EXPECT_NE(lru.find("c"), nullptr);
  EXPECT_EQ(lru.bytes(), 8);
  EXPECT_EQ(lru.size(), 2u);
  lru.insert("a", 5, 2);  // replacing an entry counts its new size only
  EXPECT_EQ(*lru.find("a"), 5);
  EXPECT_EQ(lru.bytes(), 6);
  lru.insert("big", 6, 25);  // larger than the budget: kept alone
  EXPECT_EQ(lru.size(), 1u);
  EXPECT_EQ(lru.bytes(), 25);
  EXPECT_EQ(*lru.find("big"), 6);
  lru.erase("big");
  EXPECT_EQ(lru.bytes(), 0);
  EXPECT_EQ(lru.find("big"), nullptr);
}

TEST(ByteLru, ZeroBudgetKeepsOnlyTheLastAndNegativeIsRejected) {
  ByteLru<int, int> lru(0);
  lru.insert(1, 1, 8);
  lru.insert(2, 2, 8);
  EXPECT_EQ(lru.find(1), nullptr);
  EXPECT_NE(lru.find(2), nullptr);
  GRADQ_EXPECT_THROW_MSG((ByteLru<int, int>(-1)), "byte budget must be >= 0, got -1");
  GRADQ_EXPECT_THROW_MSG(lru.insert(3, 3, -2), "must be >= 0 bytes, got -2");
}

// What insert() drops for the budget is handed to the hook (a second tier), oldest first, with its
// value; erase() hands nothing.
TEST(ByteLru, HandsWhatItDropsForTheBudgetToTheHook) {
  std::vector<std::pair<std::string, int>> dropped;
  ByteLru<std::string, int> lru(8, [&](const std::string& key, int&& value) { dropped.emplace_back(key, value); });
  lru.insert("a", 1, 4);
  lru.insert("b", 2, 4);
  lru.insert("c", 3, 8);  // both go, a first
  ASSERT_EQ(dropped.size(), 2u);
  EXPECT_EQ(dropped[0], (std::pair<std::string, int>("a", 1)));
  EXPECT_EQ(dropped[1], (std::pair<std::string, int>("b", 2)));
  lru.erase("c");
  EXPECT_EQ(dropped.size(), 2u);
  EXPECT_EQ(lru.bytes(), 0);
}

}  // namespace
}  // namespace gradq
