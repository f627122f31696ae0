# out_of_range.kt: a learning rate of zero never learns, and milestones must increase
# expect: E404 E404
graph out_of_range
data digits { val_split = 300 }
train {
  epochs = 8
  optimizer = sgd(lr=0)
  schedule = step(milestones=[6, 4])
}
node a : cnn_tiny [target]
label -> a : through
