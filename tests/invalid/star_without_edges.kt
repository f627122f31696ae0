# star_without_edges.kt: `*` as an end of an edge that does not start with `edges`
# expect: E100
graph star_without_edges
data digits { }
node a : cnn_tiny [target]
label -> * : through
